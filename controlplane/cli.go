package controlplane

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// CLI is aegis-controlplane's command line.
type CLI struct {
	cli.Globals
	GRPCPort                 uint16        `short:"g" name:"grpc-port" default:"50001" help:"TCP port of the gRPC server (the port the Aegis controller dials)."`
	ListenAddress            string        `placeholder:"HOST[:PORT]" help:"Address to listen on: IP:PORT, [IPv6]:PORT, :PORT (all addresses), or a bare IP with --grpc-port's port; empty for all addresses. A port given here wins over --grpc-port. Must be a loopback address with --insecure."`
	TLSCert                  string        `name:"tls-cert" placeholder:"FILE" help:"Server certificate (PEM); the controller expects the DNS name aegis-agent. Re-read on SIGHUP."`
	TLSKey                   string        `name:"tls-key" placeholder:"FILE" help:"Server certificate's private key (PEM). Re-read on SIGHUP."`
	TLSClientCA              string        `name:"tls-client-ca" placeholder:"FILE" help:"CA (PEM) that issues client certificates; clients must present one. Re-read on SIGHUP."`
	AllowedClientName        []string      `name:"allowed-client-name" placeholder:"NAME" help:"Only clients whose certificate has this CN or DNS SAN may call (repeatable; comma-separated in the environment). Default: any client of the client CA."`
	Insecure                 bool          `help:"Serve plaintext gRPC without client authentication, only on a loopback --listen-address (local testing)."`
	MonitorInterval          time.Duration `default:"5s" help:"Period of session.SessionManager/MonitorSessions snapshots (one daemon-wide clock, ±20% jitter; a compat write triggers one at once)."`
	MonitorSendTimeout       time.Duration `placeholder:"DURATION" help:"Drop a MonitorSessions stream whose client has not read a snapshot within this time; 0 for two --monitor-interval."`
	MonitorMaxStreamsPerPeer int           `default:"4" help:"Most MonitorSessions streams one client (certificate name) may hold open; more get ResourceExhausted."`
	MonitorMaxStreams        int           `default:"16" help:"Most MonitorSessions streams of all clients together; more get ResourceExhausted."`
	MonitorMaxMessageSize    int           `default:"4194304" placeholder:"BYTES" help:"Largest MonitorSessions snapshot in bytes: the controller's gRPC receive limit (4 MiB by default). Past it the least recently active sessions are left out."`
	MetricsAddress           string        `env:"AEGIS_CONTROLPLANE_METRICS_ADDRESS" placeholder:"HOST:PORT" help:"Serve Prometheus metrics on http://HOST:PORT/metrics; off when empty."`
	ShutdownTimeout          time.Duration `env:"AEGIS_CONTROLPLANE_SHUTDOWN_TIMEOUT" default:"10s" help:"On SIGTERM, how long in-flight calls may take before connections are closed."`
	PinPath                  string        `default:"${pin_path}" placeholder:"DIR" help:"bpffs directory holding the pinned maps (aegis-loader --pin-path)."`

	AllowSessionTakeover bool `help:"Let a grant take over a live session of another user on the same key (source, destination, port, protocol); by default it is refused with AlreadyExists until that session expires or is revoked."`

	Store            string        `default:"none" placeholder:"none|file:PATH|etcd:ENDPOINT[,...]" help:"Where sessions live besides the maps: none (the maps only), file:PATH (a database on this gateway: sessions survive a reboot) or etcd:https://HOST:PORT[,...] (shared by a fleet of gateways)."`
	StoreCA          string        `name:"store-ca" placeholder:"FILE" help:"CA (PEM) that issued the etcd servers' certificates."`
	StoreCert        string        `name:"store-cert" placeholder:"FILE" help:"Client certificate (PEM) for mutual TLS to etcd."`
	StoreKey         string        `name:"store-key" placeholder:"FILE" help:"Client certificate's private key (PEM)."`
	StorePlaintext   bool          `name:"store-plaintext" help:"Allow http:// etcd endpoints, on loopback addresses only (testing)."`
	StorePrefix      string        `name:"store-prefix" default:"/aegis/" help:"Key prefix in etcd, so that several fleets can share one cluster."`
	GatewayID        string        `name:"gateway-id" placeholder:"NAME" help:"This gateway's name in the store; default: the host name."`
	StoreAckTimeout  time.Duration `name:"store-ack-timeout" default:"2s" help:"How long a grant or revoke waits for every other live gateway to apply it before it is acknowledged anyway (counted in aegis_store_ack_timeouts_total)."`
	ActivityInterval time.Duration `name:"activity-interval" default:"10s" help:"How often this gateway publishes its sessions' activity to the store (and reaps the store); a session active within its idle timeout minus this survives a failover."`
}

// storeSpec parses --store and checks the flags that go with it.
func (c *CLI) storeSpec() (store.Spec, error) {
	spec, err := store.ParseSpec(c.Store)
	if err != nil {
		return spec, &cli.UsageError{Err: fmt.Errorf("--store: %w", err)}
	}
	if spec.Kind != "etcd" {
		return spec, nil
	}
	plain := 0
	for _, ep := range spec.Endpoints {
		if strings.HasPrefix(ep, "http://") {
			plain++
			host, _, err := net.SplitHostPort(strings.TrimPrefix(ep, "http://"))
			a, perr := netip.ParseAddr(host)
			if !c.StorePlaintext || err != nil || perr != nil || !a.IsLoopback() {
				return spec, &cli.UsageError{Err: fmt.Errorf("--store endpoint %s: plaintext is allowed only with --store-plaintext on a loopback address; use https:// with --store-ca, --store-cert and --store-key", ep)}
			}
		}
	}
	switch {
	case plain == len(spec.Endpoints):
	case plain != 0:
		return spec, &cli.UsageError{Err: errors.New("--store: mixes http:// and https:// endpoints")}
	case c.StoreCA == "" || c.StoreCert == "" || c.StoreKey == "":
		return spec, &cli.UsageError{Err: errors.New("--store etcd:https://...: needs --store-ca, --store-cert and --store-key (mutual TLS)")}
	}
	return spec, nil
}

// openStore opens the store of --store; nil for none.
func (c *CLI) openStore(log zerolog.Logger, sized func(int)) (store.Store, string, error) {
	spec, err := c.storeSpec()
	if err != nil {
		return nil, "", err
	}
	id := c.GatewayID
	if id == "" {
		if id, err = os.Hostname(); err != nil {
			return nil, "", fmt.Errorf("--gateway-id: host name: %w", err)
		}
	}
	switch spec.Kind {
	case "none":
		return nil, id, nil
	case "file":
		st, err := store.OpenFile(spec.Path)
		return st, id, err
	}
	var tlsConf *tls.Config
	if strings.HasPrefix(spec.Endpoints[0], "https://") {
		if tlsConf, err = store.TLSConfig(c.StoreCA, c.StoreCert, c.StoreKey); err != nil {
			return nil, "", err
		}
	}
	st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: spec.Endpoints, TLS: tlsConf, Prefix: c.StorePrefix, Gateway: id, Log: log,
		SnapshotSize: sized})
	return st, id, err
}

// Main runs aegis-controlplane with args until ctx ends or SIGTERM or
// SIGINT arrives, and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	var c CLI
	return cli.Run(ctx, Spec(), &c, &c.Globals, args, stdio)
}

// Spec is aegis-controlplane's command line: every flag reads
// AEGIS_<FLAG>, or AEGIS_CONTROLPLANE_<FLAG> where the reaper has a flag
// of the same name.
func Spec() cli.Spec {
	return cli.Spec{
		Name:        "aegis-controlplane",
		Description: "Serves the Aegis session gRPC APIs over mutual TLS and writes grants into the data path's pinned maps.",
		EnvPrefix:   "AEGIS",
		EveryFlag:   true,
		Vars:        kong.Vars{"pin_path": state.DefaultPinPath},
	}
}

// check validates the flags that kong cannot, as usage errors.
func (c *CLI) check() error {
	if c.MonitorInterval <= 0 {
		return &cli.UsageError{Err: fmt.Errorf("--monitor-interval %v: must be positive", c.MonitorInterval)}
	}
	if c.MonitorSendTimeout < 0 {
		return &cli.UsageError{Err: fmt.Errorf("--monitor-send-timeout %v: must not be negative", c.MonitorSendTimeout)}
	}
	if c.MonitorMaxStreamsPerPeer < 1 || c.MonitorMaxStreams < 1 {
		return &cli.UsageError{Err: fmt.Errorf("--monitor-max-streams-per-peer %d, --monitor-max-streams %d: must be at least 1", c.MonitorMaxStreamsPerPeer, c.MonitorMaxStreams)}
	}
	if c.MonitorMaxMessageSize < 1024 {
		return &cli.UsageError{Err: fmt.Errorf("--monitor-max-message-size %d: want at least 1024 bytes", c.MonitorMaxMessageSize)}
	}
	if c.StoreAckTimeout <= 0 || c.ActivityInterval <= 0 {
		return &cli.UsageError{Err: fmt.Errorf("--store-ack-timeout %v, --activity-interval %v: must be positive", c.StoreAckTimeout, c.ActivityInterval)}
	}
	if _, err := c.storeSpec(); err != nil {
		return err
	}
	if c.ShutdownTimeout < 0 {
		return &cli.UsageError{Err: fmt.Errorf("--shutdown-timeout %v: must not be negative", c.ShutdownTimeout)}
	}
	if _, err := c.listenAddress(); err != nil {
		return &cli.UsageError{Err: err}
	}
	tlsFlags := map[string]string{"--tls-cert": c.TLSCert, "--tls-key": c.TLSKey, "--tls-client-ca": c.TLSClientCA}
	if c.Insecure {
		for name, v := range tlsFlags {
			if v != "" {
				return &cli.UsageError{Err: fmt.Errorf("--insecure and %s exclude each other", name)}
			}
		}
		if len(c.AllowedClientName) > 0 {
			return &cli.UsageError{Err: errors.New("--insecure and --allowed-client-name exclude each other: without TLS there is no client name")}
		}
		return nil
	}
	var missing []string
	for _, name := range []string{"--tls-cert", "--tls-key", "--tls-client-ca"} {
		if tlsFlags[name] == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return &cli.UsageError{Err: fmt.Errorf("mutual TLS needs %s (or --insecure on a loopback address, for testing)", strings.Join(missing, ", "))}
	}
	return nil
}

// listen returns the gRPC listener: the one systemd passed (socket
// activation, LISTEN_FDS) or a new one on --listen-address:--grpc-port.
func (c *CLI) listen(log zerolog.Logger) (net.Listener, error) {
	lns, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	var ln net.Listener
	for _, l := range lns {
		if l == nil {
			continue
		}
		if ln != nil {
			l.Close()
			continue
		}
		ln = l
	}
	if ln != nil {
		log.Info().Stringer("address", ln.Addr()).Msg("using the listening socket passed by systemd; --listen-address and --grpc-port are ignored")
	} else if len(lns) > 0 {
		return nil, errors.New("socket activation: systemd passed no listening stream socket")
	} else {
		addr, err := c.listenAddress()
		if err != nil {
			return nil, &cli.UsageError{Err: err}
		}
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("listen for gRPC: %w", err)
		}
	}
	if c.Insecure && !isLoopback(ln.Addr()) {
		ln.Close()
		return nil, insecureRefused(ln.Addr().String())
	}
	return ln, nil
}

// listenAddress is the gRPC server's HOST:PORT from --listen-address,
// which takes the metrics flags' HOST:PORT form, and --grpc-port, whose
// port applies to a bare IP (the flag's older form) or an empty address.
// The host must be an IP: the agent listens on its own addresses, which a
// name could resolve away from.
func (c *CLI) listenAddress() (string, error) {
	s := c.ListenAddress
	port := strconv.Itoa(int(c.GRPCPort))
	if s == "" {
		return net.JoinHostPort("", port), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return net.JoinHostPort(a.String(), port), nil
	}
	host, p, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("--listen-address %q: not an IP address, IP:PORT, [IPv6]:PORT or :PORT", s)
	}
	if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
		return "", fmt.Errorf("--listen-address %q: port %q: want 1-65535", s, p)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", fmt.Errorf("--listen-address %q: %q is not an IP address", s, host)
		}
	}
	return net.JoinHostPort(host, p), nil
}

func insecureRefused(where string) error {
	return &cli.UsageError{Err: fmt.Errorf("--insecure on %s refused: plaintext is allowed on a loopback address only (--listen-address 127.0.0.1 or ::1)", where)}
}

func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// gcPercent is the daemon's GOGC unless the environment sets one.
const gcPercent = 400

// Run serves until ctx ends or a SIGTERM or SIGINT arrives.
func (c *CLI) Run(ctx context.Context, log zerolog.Logger) error {
	if err := c.check(); err != nil {
		return err
	}
	// The daemon's live heap is a few megabytes. At Go's default GOGC=100
	// a busy control plane would collect about a hundred times a second,
	// and the collector's work shows in the grants' tail latency; 400
	// keeps the heap in the tens of megabytes and collects a quarter as
	// often. An operator's GOGC wins.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
	// GOGC=400 would let the heap grow to five times what is live; the
	// soft limit keeps it within the bound the MonitorSessions caps give
	// (docs/operations.md), collecting harder near it. GOMEMLIMIT wins.
	// With a store, the limit grows with the store's index.
	var storeMemory func(int)
	if os.Getenv("GOMEMLIMIT") == "" {
		bound := MemoryBound(c.MonitorMaxStreams, c.MonitorMaxMessageSize)
		debug.SetMemoryLimit(bound)
		ceiling, _ := cgroupMemoryMax("/proc/self/cgroup", "/sys/fs/cgroup")
		storeMemory = func(n int) { debug.SetMemoryLimit(StoreMemoryBound(bound, n, ceiling)) }
	}
	// --insecure needs a loopback listen address; say so before binding
	// anything (socket activation is checked on the socket itself).
	if c.Insecure && os.Getenv("LISTEN_FDS") == "" {
		addr, _ := c.listenAddress() // checked above
		host, _, _ := net.SplitHostPort(addr)
		if a, _ := netip.ParseAddr(host); !a.IsLoopback() {
			where := addr
			if host == "" {
				where = "all addresses"
			}
			return insecureRefused(where)
		}
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	var certs *Certificates
	if !c.Insecure {
		var err error
		if certs, err = LoadCertificates(c.TLSCert, c.TLSKey, c.TLSClientCA, log); err != nil {
			return err
		}
	} else {
		log.Warn().Msg("--insecure: plaintext gRPC without client authentication")
	}

	maps := state.NewHandle(c.PinPath, state.OpenOptions{Writable: true}, log)
	defer maps.Close()
	// Starting before the loader is fine (the maps are opened when they
	// appear); a permission or layout problem is not going away by
	// itself, so it stops the daemon with the fix in the message.
	if err := maps.Refresh(); err != nil && !errors.Is(err, state.ErrNotLoaded) {
		return err
	}

	st, gateway, err := c.openStore(log, storeMemory)
	if err != nil {
		return err
	}
	if st != nil {
		log.Info().Str("store", c.Store).Str("gateway_id", gateway).Msg("sessions are kept in the store; the maps are its cache")
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := New(Options{
		Maps:                  maps,
		Log:                   log,
		Certificates:          certs,
		AllowedClientNames:    c.AllowedClientName,
		MonitorInterval:       c.MonitorInterval,
		MonitorSendTimeout:    c.MonitorSendTimeout,
		MonitorStreamsPerPeer: c.MonitorMaxStreamsPerPeer,
		MonitorStreams:        c.MonitorMaxStreams,
		MonitorMaxMessageSize: c.MonitorMaxMessageSize,
		Registerer:            reg,

		AllowSessionTakeover: c.AllowSessionTakeover,

		Store:            st,
		Gateway:          gateway,
		AckTimeout:       c.StoreAckTimeout,
		ActivityInterval: c.ActivityInterval,
		StoreMemory:      storeMemory,
	})
	if err != nil {
		if st != nil {
			st.Close()
		}
		return err
	}

	ln, err := c.listen(log)
	if err != nil {
		return err
	}
	var ms *daemon.MetricsServer
	if c.MetricsAddress != "" {
		if ms, err = daemon.ListenMetrics(c.MetricsAddress, reg); err != nil {
			ln.Close()
			return err
		}
		go ms.Serve(log)
		log.Info().Stringer("address", ms.Addr()).Msg("serving metrics")
	}

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info().Stringer("address", ln.Addr()).Bool("tls", certs != nil).Bool("datapath_loaded", srv.Loaded()).
		Bool("allow_session_takeover", c.AllowSessionTakeover).
		Msg("serving session.SessionManager and aegis.agent.v1.AgentService")
	if ready := srv.StoreReady(); ready != nil {
		// A rebooted gateway logs no one out: every stored session is in
		// the maps before systemd hears READY=1.
		daemon.Status("restoring sessions from the store")
		select {
		case <-ready:
			log.Info().Msg("sessions restored from the store")
		case <-ctx.Done():
		case serveErr := <-served:
			served <- serveErr
		}
	}
	daemon.Ready(log)
	go daemon.Watchdog(ctx, log, srv.Healthy)

	var serveErr error
	stopped := false
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info().Msg("stopping")
			break loop
		case serveErr = <-served:
			stopped = true
			break loop
		case <-hup:
			if certs == nil {
				log.Info().Msg("SIGHUP: no TLS files to reload (--insecure)")
				continue
			}
			if err := certs.Reload(); err == nil {
				log.Info().Msg("SIGHUP: reloaded the TLS files; new connections use them")
			}
		}
	}
	daemon.Stopping(log)
	sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
	defer cancel()
	srv.Shutdown(sctx)
	if ms != nil {
		_ = ms.Shutdown(sctx)
	}
	if !stopped {
		serveErr = <-served
	}
	return serveErr
}

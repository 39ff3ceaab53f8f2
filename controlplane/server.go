// Package controlplane is aegis-controlplane: the gRPC server through which
// the Aegis controller grants and revokes sessions in the data path's
// pinned maps. It serves the original agent's session.SessionManager
// (compat.go; its MonitorSessions stream in monitor.go, snapshot.go and
// codec.go), the full aegis.agent.v1.AgentService (agent.go; the pages of
// ListSessions in list.go), the standard health service and server
// reflection on one listener, over mutual TLS (tls.go, auth.go), and
// exports Prometheus metrics (metrics.go; refused TLS handshakes in
// tlsmetrics.go). The command line and the
// systemd integration are in cli.go. With a session store (--store), the
// maps are the store's cache: writes go through the store (storewrite.go),
// one loop applies the store to the maps (storeloop.go), and the gateways
// share their sessions' activity (storeactivity.go).
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"net"
	"sync"
	"sync/atomic"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// Defaults of Options.
const (
	DefaultMonitorInterval = 5 * time.Second
	DefaultRefreshInterval = time.Second
)

// Options configure a Server.
type Options struct {
	// Maps is the handle on the pinned maps, opened writable. The server
	// refreshes it every RefreshInterval, so it may be created before the
	// loader has run.
	Maps *state.Handle
	// Log receives the server's log, the audit lines included.
	Log zerolog.Logger
	// Certificates secure the listener with mutual TLS; nil serves
	// plaintext (--insecure).
	Certificates *Certificates
	// AllowedClientNames, when not empty, is the allowlist of client
	// certificate names (CN or DNS SAN) that may call any RPC.
	AllowedClientNames []string
	// MonitorInterval is the period of MonitorSessions snapshots (with
	// jitter, see monitor.go).
	MonitorInterval time.Duration
	// MonitorSendTimeout is how long a MonitorSessions send may block on
	// a client that does not read before the stream is dropped; 0 for two
	// intervals.
	MonitorSendTimeout time.Duration
	// MonitorStreamsPerPeer and MonitorStreams cap the MonitorSessions
	// streams of one client name and of all clients; 0 for the defaults.
	MonitorStreamsPerPeer int
	MonitorStreams        int
	// MonitorMaxMessageSize is the largest snapshot sent, in bytes; 0 for
	// DefaultMonitorMaxMessageSize, what a gRPC client accepts by default.
	MonitorMaxMessageSize int
	// RefreshInterval is how often the pinned maps are checked for an
	// unload or a reload.
	RefreshInterval time.Duration
	// Registerer receives the server's metrics; nil for none.
	Registerer prometheus.Registerer
	// AllowSessionTakeover lets a grant replace a live session of another
	// user (see claim); by default it is refused with AlreadyExists.
	AllowSessionTakeover bool

	// Store, when not nil, holds the sessions; the maps are then its cache
	// (storeloop.go). The server closes it on Shutdown.
	Store store.Store
	// Gateway is this gateway's name in the store.
	Gateway string
	// AckTimeout bounds the wait for the other live gateways to apply a
	// write; 0 for DefaultAckTimeout.
	AckTimeout time.Duration
	// ActivityInterval is how often this gateway publishes its sessions'
	// activity and reaps the store; 0 for DefaultActivityInterval.
	ActivityInterval time.Duration
	// Clock converts the store's wall-clock times; the zero value reads
	// the real clocks.
	Clock store.Clock
	// StoreMemory, when not nil, is told how many sessions the store's
	// index holds or is about to: before a resync the index's size, after
	// a restore and as grants grow it its size. The daemon sets its soft
	// memory limit from it (StoreMemoryBound), so that the collector does
	// not run without pause against a limit below what the index needs.
	StoreMemory func(sessions int)
}

// Defaults of the store options.
const (
	DefaultAckTimeout       = 2 * time.Second
	DefaultActivityInterval = 10 * time.Second
)

// Server serves both session APIs over one grpc.Server.
type Server struct {
	opts   Options
	log    zerolog.Logger
	maps   *state.Handle
	grpc   *grpc.Server
	health *health.Server
	m      *metrics
	auth   *authorizer
	codec  *requestCodec
	mon    *monitor
	// sl is the store loop; nil without a store.
	sl *storeLoop
	// vh reads the verdict events for WatchVerdicts (watch.go).
	vh verdictHub
	// tlsFailures counts refused handshakes (tlsmetrics.go).
	tlsFailures *prometheus.CounterVec

	// keys serializes this process's grants of one key, so that the
	// check of who holds a session and the write that replaces it are
	// one step (see claim).
	keys keyLocks
	// afterClaim, if set, runs between a grant's check of the session's
	// holder and its write: a test seam.
	afterClaim func()

	// bulk serializes the operations that read sessions and then write
	// them by key (revoking a user, IpChange, a revoke checked against a
	// user) against this process's single-key grants and revokes, so that
	// a session granted meanwhile is never deleted or moved by mistake.
	bulk sync.RWMutex

	// stopping is closed when Shutdown starts: long-lived streams end.
	stopping    chan struct{}
	stopOnce    sync.Once
	storeStop   context.CancelFunc
	lastRefresh atomic.Int64 // unix nanoseconds of the last refresh
	loaded      atomic.Bool  // the maps were usable at the last refresh
	filtered    atomic.Bool  // and every configured interface was filtered

	// Owned by refresh, which runs in New and then in the refresh loop
	// only: the last outcome, to log changes rather than every tick.
	marksErr   string // trustMarks'
	refreshed  bool
	refreshErr string
	unfiltered string
}

// Names of the services, as the health service reports them.
var serviceNames = []string{session.SessionManager_ServiceDesc.ServiceName, agentv1.AgentService_ServiceDesc.ServiceName}

// healthNames are the health service's entries that follow the data path:
// both session services and the server as a whole ("").
var healthNames = append([]string{""}, serviceNames...)

// New builds the server; Serve starts it.
func New(opts Options) (*Server, error) {
	if opts.Maps == nil {
		return nil, errors.New("controlplane: no maps handle")
	}
	if opts.MonitorInterval <= 0 {
		opts.MonitorInterval = DefaultMonitorInterval
	}
	if opts.RefreshInterval <= 0 {
		opts.RefreshInterval = DefaultRefreshInterval
	}
	if opts.MonitorSendTimeout <= 0 {
		opts.MonitorSendTimeout = 2 * opts.MonitorInterval
	}
	if opts.MonitorStreamsPerPeer <= 0 {
		opts.MonitorStreamsPerPeer = DefaultMonitorStreamsPerPeer
	}
	if opts.MonitorStreams <= 0 {
		opts.MonitorStreams = DefaultMonitorStreams
	}
	if opts.MonitorMaxMessageSize <= 0 {
		opts.MonitorMaxMessageSize = DefaultMonitorMaxMessageSize
	}
	s := &Server{
		opts:     opts,
		log:      opts.Log,
		maps:     opts.Maps,
		health:   health.NewServer(),
		stopping: make(chan struct{}),
		codec:    newRequestCodec(),
	}
	s.keys.seed = maphash.MakeSeed()
	s.lastRefresh.Store(time.Now().UnixNano())
	s.mon = newMonitor(s, &opts)
	s.tlsFailures = newTLSFailures()
	if opts.Store != nil {
		if opts.AckTimeout <= 0 {
			opts.AckTimeout = DefaultAckTimeout
		}
		if opts.ActivityInterval <= 0 {
			opts.ActivityInterval = DefaultActivityInterval
		}
		s.opts = opts
		s.sl = newStoreLoop(s, &opts)
	}
	s.m = newMetrics(s)

	grpcMetrics := grpcprom.NewServerMetrics(
		grpcprom.WithServerCounterOptions(grpcprom.WithNamespace("aegis")),
		grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramNamespace("aegis"),
			grpcprom.WithHistogramBuckets([]float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5}),
		),
	)
	s.auth = newAuthorizer(opts.AllowedClientNames, opts.Certificates != nil, opts.Log)
	serverOpts := []grpc.ServerOption{
		// Requests that do not decode are refused by the guards, not by
		// grpc-go (decode.go); MonitorSessions snapshots go out
		// pre-encoded (codec.go).
		grpc.ForceServerCodecV2(s.codec),
		// Metrics outermost, so that refused calls are counted with their
		// code; the unary guard before anything that may refuse a call.
		grpc.ChainUnaryInterceptor(grpcMetrics.UnaryServerInterceptor(), s.guardUnary, s.auth.unary),
		grpc.ChainStreamInterceptor(grpcMetrics.StreamServerInterceptor(), s.auth.stream, s.guardStream),
		// A controller that vanished without closing its connection (a
		// crash, a cut link) is found out and its MonitorSessions stream
		// ended.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
		// Clients may ping every 10 s, also between RPCs, without being
		// sent away for "too many pings".
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// A client gets 10 s for its TLS handshake, not the default 120.
		grpc.ConnectionTimeout(10 * time.Second),
		// A dropped MonitorSessions stream learns when its connection
		// ends (monitor.go).
		grpc.StatsHandler(connTracker{}),
	}
	if opts.Certificates != nil {
		serverOpts = append(serverOpts, grpc.Creds(
			newHandshakeObserver(opts.Certificates.credentials(), s.tlsFailures, s.auth.allows, opts.Log)))
	}
	s.grpc = grpc.NewServer(serverOpts...)
	session.RegisterSessionManagerServer(s.grpc, &compatService{s: s})
	agentv1.RegisterAgentServiceServer(s.grpc, &agentService{s: s})
	healthpb.RegisterHealthServer(s.grpc, &healthService{Server: s.health, stopping: s.stopping})
	reflection.Register(s.grpc)
	for _, name := range healthNames {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	if opts.Registerer != nil {
		grpcMetrics.InitializeMetrics(s.grpc)
		for _, c := range append(s.m.collectors(), grpcMetrics) {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	s.refresh()
	return s, nil
}

// Serve answers on ln until Shutdown. It also keeps the maps handle in
// step with the pins.
func (s *Server) Serve(ln net.Listener) error {
	done := make(chan struct{})
	defer close(done)
	go s.refreshLoop(done)
	go s.mon.run(done)
	if s.sl != nil {
		ctx, cancel := context.WithCancel(context.Background())
		s.storeStop = cancel
		defer cancel()
		go s.sl.run(ctx)
	}
	if err := s.grpc.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve gRPC on %s: %w", ln.Addr(), err)
	}
	return nil
}

func (s *Server) refreshLoop(done <-chan struct{}) {
	tick := time.NewTicker(s.opts.RefreshInterval)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-s.stopping:
			return
		case <-tick.C:
			s.refresh()
		}
	}
}

// trustMarks has the data path trust the session marks this process keeps
// (state.Maps.TrustSessionMarks) where a load cleared the trust or made
// the map. Until then every lookup is made, so a failure costs speed only.
func (s *Server) trustMarks() {
	err := s.maps.Do(func(m *state.Maps) error {
		start := time.Now()
		set, err := m.TrustSessionMarks()
		if set {
			s.log.Info().Dur("took", time.Since(start)).Msg("port marks trusted: the data path skips lookups at ports no session is for")
		}
		return err
	})
	msg := ""
	if err != nil && !errors.Is(err, state.ErrNotLoaded) {
		msg = err.Error()
	}
	if msg != "" && msg != s.marksErr {
		s.log.Warn().Err(err).Msg("port marks not trusted; the data path makes every lookup")
	}
	s.marksErr = msg
}

// refresh reopens the maps if the loader replaced them, and sets the
// session services' health (and the overall "" service's) to whether the
// data path enforces: the maps are usable and every configured interface
// is filtered.
//
// Grants are still accepted while an interface is unfiltered: a grant
// never widens what passes beyond its own session, the unfiltered
// interface passes everything anyway, and refusing would turn an
// interface flap into a login outage for every user. The health says
// NOT_SERVING so that the controller and the operator know.
func (s *Server) refresh() {
	err := s.maps.Refresh()
	s.lastRefresh.Store(time.Now().UnixNano())
	msg, unfiltered := "", ""
	if err != nil {
		msg = err.Error()
	} else {
		_, unfiltered = state.NotFiltered(s.maps.PinPath())
	}
	if !s.refreshed || msg != s.refreshErr || unfiltered != s.unfiltered {
		switch {
		case err != nil:
			s.log.Warn().Err(err).Msg("data path maps unusable: session RPCs fail until this is fixed")
			daemon.Status("NOT_SERVING; session RPCs fail: " + msg)
		case unfiltered != "":
			s.log.Warn().Str("not_filtered", unfiltered).
				Msg("a configured interface is not filtered: health NOT_SERVING, grants still accepted")
			daemon.Status("NOT_SERVING; not filtered: " + unfiltered)
		default:
			if s.refreshed {
				s.log.Info().Str("pin_path", s.maps.PinPath()).Msg("data path enforcing again: maps usable, every configured interface filtered")
			}
			daemon.Status("serving; data path maps at " + s.maps.PinPath())
		}
		s.refreshed, s.refreshErr, s.unfiltered = true, msg, unfiltered
	}
	if err == nil {
		s.followEvents()
		s.trustMarks()
	}
	s.loaded.Store(err == nil)
	s.filtered.Store(err == nil && unfiltered == "")
	select {
	case <-s.stopping:
		return // health stays NOT_SERVING
	default:
	}
	status := healthpb.HealthCheckResponse_SERVING
	if err != nil || unfiltered != "" || (s.sl != nil && !s.sl.serving()) {
		// With a store, also while it is unreachable or the maps are not
		// restored from it yet: grants and revokes are refused then.
		status = healthpb.HealthCheckResponse_NOT_SERVING
	}
	for _, name := range healthNames {
		s.health.SetServingStatus(name, status)
	}
}

// Healthy returns nil while the server's housekeeping runs: the systemd
// watchdog's check. Missing pins do not make the process unhealthy (a
// restart would not bring them back); a wedged refresh loop does.
func (s *Server) Healthy() error {
	age := time.Since(time.Unix(0, s.lastRefresh.Load()))
	if limit := 5 * s.opts.RefreshInterval; age > limit+5*time.Second {
		return fmt.Errorf("maps refresh last ran %v ago", age.Round(time.Second))
	}
	return nil
}

// StoreReady is closed once the maps were first restored from the store;
// nil without a store.
func (s *Server) StoreReady() <-chan struct{} {
	if s.sl == nil {
		return nil
	}
	return s.sl.Ready()
}

// Loaded reports whether the pinned maps were usable at the last check.
func (s *Server) Loaded() bool { return s.loaded.Load() }

// Filtered reports whether, at the last check, the maps were usable and
// every configured interface was filtered: what the health reports.
func (s *Server) Filtered() bool { return s.filtered.Load() }

// Shutdown stops the server: health turns NOT_SERVING, MonitorSessions
// and health watch streams end, in-flight calls get until ctx ends to
// finish, then every connection is closed.
func (s *Server) Shutdown(ctx context.Context) {
	s.stopOnce.Do(func() {
		s.health.Shutdown()
		close(s.stopping)
	})
	if s.sl != nil {
		defer s.sl.close(ctx)
	}
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn().Msg("graceful stop timed out: closing the remaining connections")
		s.grpc.Stop()
		<-done
	}
}

// healthService is the standard health service, except that a Watch
// stream ends when the server shuts down (after a last NOT_SERVING)
// instead of holding the graceful stop until its deadline.
type healthService struct {
	*health.Server
	stopping <-chan struct{}
}

func (h *healthService) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- h.Server.Watch(req, &watchStream{stream, ctx}) }()
	select {
	case err := <-done:
		return err
	case <-h.stopping:
		cancel()
		<-done
		_ = stream.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING})
		return errShuttingDown
	}
}

type watchStream struct {
	healthpb.Health_WatchServer
	ctx context.Context
}

func (w *watchStream) Context() context.Context { return w.ctx }

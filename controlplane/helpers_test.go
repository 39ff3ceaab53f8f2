package controlplane_test

import (
	"context"
	"crypto/tls"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// env is a control plane serving mutual TLS on loopback over a test's own
// pinned maps, with a PKI to make clients from.
type env struct {
	t       testing.TB
	pin     string
	ca      *pki.CA
	dir     string // TLS files
	certs   *controlplane.Certificates
	srv     *controlplane.Server
	addr    string
	reg     *prometheus.Registry
	logs    *tu.Buffer
	handle  *state.Handle
	stopped bool
}

type envOptions struct {
	capacity  uint32
	noPins    bool // start before the "loader"
	allowed   []string
	interval  time.Duration
	refresh   time.Duration
	defIdle   time.Duration
	serverDNS []string
	// MonitorSessions options; zero for the defaults.
	perPeer, streams int
	sendTimeout      time.Duration
	// setup runs on the server before it serves.
	setup    func(*controlplane.Server)
	takeover bool // --allow-session-takeover
	// store, when set, keeps the sessions (--store); the env waits for
	// the first restore before it returns.
	store            store.Store
	gateway          string
	ackTimeout       time.Duration
	activityInterval time.Duration
	storeMemory      func(int)
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	e := &env{t: t, pin: tu.PinDir(t), dir: t.TempDir(), reg: prometheus.NewRegistry(), logs: &tu.Buffer{}}
	if !o.noPins {
		tu.PinMaps(t, e.pin, tu.PinOptions{Capacity: o.capacity, DefaultIdleTimeout: o.defIdle})
	}
	var err error
	if e.ca, err = pki.NewCA("aegis test CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	srvPair, err := e.ca.IssueServer(pki.ServerOptions{DNSNames: o.serverDNS})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := e.file("server.crt"), e.file("server.key"), e.file("ca.crt")
	if err := srvPair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFile(caFile, e.ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	log := zerolog.New(e.logs).Level(zerolog.DebugLevel)
	if e.certs, err = controlplane.LoadCertificates(certFile, keyFile, caFile, log); err != nil {
		t.Fatal(err)
	}
	e.handle = state.NewHandle(e.pin, state.OpenOptions{Writable: true}, log)
	t.Cleanup(func() { e.handle.Close() })
	e.srv, err = controlplane.New(controlplane.Options{
		Maps:                  e.handle,
		Log:                   log,
		Certificates:          e.certs,
		AllowedClientNames:    o.allowed,
		MonitorInterval:       o.interval,
		RefreshInterval:       o.refresh,
		Registerer:            e.reg,
		MonitorStreamsPerPeer: o.perPeer,
		MonitorStreams:        o.streams,
		MonitorSendTimeout:    o.sendTimeout,

		AllowSessionTakeover: o.takeover,

		Store:            o.store,
		Gateway:          o.gateway,
		AckTimeout:       o.ackTimeout,
		ActivityInterval: o.activityInterval,
		StoreMemory:      o.storeMemory,
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.setup != nil {
		o.setup(e.srv)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()
	if o.store != nil && !o.noPins {
		select {
		case <-e.srv.StoreReady():
		case <-time.After(30 * time.Second):
			t.Fatalf("maps not restored from the store within 30 s:\n%s", e.logs.String())
		}
	}
	t.Cleanup(func() {
		e.stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", e.logs.String())
		}
	})
	return e
}

func (e *env) stop() {
	if e.stopped {
		return
	}
	e.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e.srv.Shutdown(ctx)
}

func (e *env) file(name string) string { return filepath.Join(e.dir, name) }

// client issues a client certificate named name from the env's CA.
func (e *env) client(name string) tls.Certificate {
	e.t.Helper()
	return clientCert(e.t, e.ca, name)
}

func clientCert(t testing.TB, ca *pki.CA, name string) tls.Certificate {
	t.Helper()
	p, err := ca.IssueClient(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c, err := p.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dial connects as the Aegis controller does: server name aegis-agent,
// the env's CA as root, the given client certificates.
func (e *env) dial(certs ...tls.Certificate) *grpc.ClientConn {
	e.t.Helper()
	return e.dialWith(&tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool(), Certificates: certs})
}

func (e *env) dialWith(cfg *tls.Config) *grpc.ClientConn {
	e.t.Helper()
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

// controller returns clients of both services as the "controller".
func (e *env) controller() (agentv1.AgentServiceClient, session.SessionManagerClient) {
	conn := e.dial(e.client("controller"))
	return agentv1.NewAgentServiceClient(conn), session.NewSessionManagerClient(conn)
}

func (e *env) maps() *state.Maps {
	e.t.Helper()
	m, err := state.Open(e.pin, state.OpenOptions{Writable: true})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	return m
}

// dump returns every session in the maps.
func (e *env) dump() map[state.Key]state.Session {
	e.t.Helper()
	out := make(map[state.Key]state.Session)
	for s, err := range e.maps().Sessions() {
		if err != nil {
			e.t.Fatal(err)
		}
		out[s.Key] = s
	}
	return out
}

// sameSessions fails t unless the maps hold exactly want.
func (e *env) sameSessions(what string, want map[state.Key]state.Session) {
	e.t.Helper()
	got := e.dump()
	if len(got) != len(want) {
		e.t.Fatalf("%s: %d sessions, want %d:\n got %v\nwant %v", what, len(got), len(want), got, want)
	}
	for k, s := range want {
		if got[k] != s {
			e.t.Fatalf("%s: session %v is %+v, want %+v", what, k, got[k], s)
		}
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func durationOf(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

// dialInsecure connects without TLS.
func (e *env) dialInsecure(addr string) *grpc.ClientConn {
	e.t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

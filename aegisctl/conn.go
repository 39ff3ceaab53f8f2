package aegisctl

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/aegis-agent/aegis/internal/cli"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// DefaultPort is the agent's gRPC port: an --address without a port
// dials it (gRPC's own default would be 443, the controller's login port).
const DefaultPort = 50001

// Profiles are the flags that select a profile. They belong to aegisctl
// itself, not to a command, so that "aegisctl --profile gw1 sessions" and
// "aegisctl sessions --profile gw1" both work.
type Profiles struct {
	Config  string `env:"AEGISCTL_CONFIG" default:"${config_file}" placeholder:"FILE" help:"Profile file (default ${default})."`
	Profile string `env:"AEGISCTL_PROFILE" placeholder:"NAME" help:"Profile of the profile file to use; default: its default-profile."`
}

// Conn are the flags of the commands that call the control plane. They are
// settings, not actions: each reads an AEGISCTL_* variable and a key of the
// profile (the profile tag names it). Precedence: flag, then environment,
// then profile, then the default shown in --help.
type Conn struct {
	Address    string        `short:"a" env:"AEGISCTL_ADDRESS" profile:"address" default:"localhost:${default_port}" placeholder:"HOST[:PORT]" help:"Control plane address (default ${default}); the port defaults to ${default_port}. IPv6 bare or as [2001:db8::1]:PORT."`
	TLSCert    string        `name:"tls-cert" env:"AEGISCTL_TLS_CERT" profile:"tls-cert" placeholder:"FILE" help:"Client certificate (PEM) issued by the CA the control plane trusts (its --tls-client-ca)."`
	TLSKey     string        `name:"tls-key" env:"AEGISCTL_TLS_KEY" profile:"tls-key" placeholder:"FILE" help:"Client certificate's private key (PEM)."`
	TLSCA      string        `name:"tls-ca" env:"AEGISCTL_TLS_CA" profile:"tls-ca" placeholder:"FILE" help:"CA (PEM) that issued the control plane's server certificate."`
	ServerName string        `env:"AEGISCTL_SERVER_NAME" profile:"server-name" default:"${server_name}" placeholder:"NAME" help:"Name to verify in the control plane's certificate (default ${default})."`
	Insecure   bool          `env:"AEGISCTL_INSECURE" profile:"insecure" help:"Plaintext, for a control plane run with --insecure on loopback."`
	Timeout    time.Duration `env:"AEGISCTL_TIMEOUT" profile:"timeout" default:"10s" help:"Deadline of each call."`

	// diag holds the transport's last failure, with its error types,
	// for explain; tlsCfg is the configuration dialed with, nil for
	// plaintext.
	diag   *transportDiag
	tlsCfg *tls.Config
}

// target is the address to dial: addr with DefaultPort if it has none.
// IPv6 literals may come bracketed or bare.
func target(addr string) (string, error) {
	addr = strings.TrimSpace(addr)
	if addr == "" {
		return "", &cli.UsageError{Err: errors.New("--address is empty")}
	}
	if a, err := netip.ParseAddr(addr); err == nil {
		return net.JoinHostPort(a.String(), strconv.Itoa(DefaultPort)), nil
	}
	if strings.HasPrefix(addr, "[") && strings.HasSuffix(addr, "]") {
		a, err := netip.ParseAddr(addr[1 : len(addr)-1])
		if err != nil {
			return "", &cli.UsageError{Err: fmt.Errorf("--address %q: not an IPv6 address in brackets", addr)}
		}
		return net.JoinHostPort(a.String(), strconv.Itoa(DefaultPort)), nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		if strings.Contains(addr, ":") || strings.ContainsAny(addr, "[]") {
			return "", &cli.UsageError{Err: fmt.Errorf("--address %q: want HOST, HOST:PORT, IP, IPv4:PORT or [IPv6]:PORT", addr)}
		}
		return net.JoinHostPort(addr, strconv.Itoa(DefaultPort)), nil
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", &cli.UsageError{Err: fmt.Errorf("--address %q: port %q is not a number from 1 to 65535", addr, port)}
	}
	if host == "" {
		return "", &cli.UsageError{Err: fmt.Errorf("--address %q: no host", addr)}
	}
	return addr, nil
}

// tlsConfig loads the client's certificate and the CA.
func (c *Conn) tlsConfig() (*tls.Config, error) {
	var missing []string
	for _, f := range []struct{ name, v string }{{"--tls-cert", c.TLSCert}, {"--tls-key", c.TLSKey}, {"--tls-ca", c.TLSCA}} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return nil, &cli.UsageError{Err: fmt.Errorf(
			"mutual TLS needs --tls-cert, --tls-key and --tls-ca (missing %s; set them in a profile, or run aegisctl certs client NAME on the gateway), or --insecure for a plaintext control plane on loopback",
			strings.Join(missing, ", "))}
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("load client certificate %s: %w", c.TLSCert, err)
	}
	caPEM, err := os.ReadFile(c.TLSCA)
	if err != nil {
		return nil, fmt.Errorf("read CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("read CA %s: no PEM certificate in it", c.TLSCA)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		ServerName:   c.ServerName,
		RootCAs:      roots,
		Certificates: []tls.Certificate{cert},
	}, nil
}

// dial connects to the control plane. The connection is lazy: errors show
// on the first call, where explain turns them into one line naming the
// cause.
func (c *Conn) dial() (*grpc.ClientConn, error) {
	addr, err := target(c.Address)
	if err != nil {
		return nil, err
	}
	c.diag = &transportDiag{}
	var creds credentials.TransportCredentials = insecure.NewCredentials()
	if !c.Insecure {
		cfg, err := c.tlsConfig()
		if err != nil {
			return nil, err
		}
		c.tlsCfg = cfg.Clone()
		creds = credentials.NewTLS(cfg)
	}
	var d net.Dialer
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(&recordingCreds{TransportCredentials: creds, diag: c.diag}),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			nc, err := d.DialContext(ctx, "tcp", a)
			if err != nil {
				c.diag.set(stageDial, err)
				return nil, err
			}
			c.diag.set(stageConnected, nil)
			return nc, nil
		}),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return c.explain(addr, invoker(ctx, method, req, reply, cc, opts...))
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			s, err := streamer(ctx, desc, cc, method, opts...)
			return s, c.explain(addr, err)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return conn, nil
}

// agent dials and returns the AgentService client with a closer.
func (c *Conn) agent() (agentv1.AgentServiceClient, func(), error) {
	conn, err := c.dial()
	if err != nil {
		return nil, nil, err
	}
	return agentv1.NewAgentServiceClient(conn), func() { conn.Close() }, nil
}

func (c *Conn) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, c.Timeout)
}

// Transport stages whose failure transportDiag keeps.
const (
	stageDial      = "dial"
	stageConnected = "connected" // no failure: TCP is up, the handshake pending
	stageHandshake = "handshake"
	stageRead      = "read"
)

// transportDiag is the last failure of the connection's transport, kept
// with its error chain: gRPC reports it to the caller only as a status
// message, without the x509 and tls error types that tell the causes
// apart.
type transportDiag struct {
	mu    sync.Mutex
	stage string
	err   error
}

func (d *transportDiag) set(stage string, err error) {
	d.mu.Lock()
	d.stage, d.err = stage, err
	d.mu.Unlock()
}

func (d *transportDiag) get() (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stage, d.err
}

// recordingCreds are transport credentials that record handshake
// failures, and the first failed read after a handshake: with TLS 1.3 the
// server refuses a client certificate after the client's side of the
// handshake is done, so the refusal (an alert) arrives on that read.
type recordingCreds struct {
	credentials.TransportCredentials
	diag *transportDiag
}

func (r *recordingCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := r.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		r.diag.set(stageHandshake, err)
		return nil, nil, err
	}
	r.diag.set("", nil)
	return &recordingConn{Conn: conn, diag: r.diag}, info, nil
}

func (r *recordingCreds) Clone() credentials.TransportCredentials {
	return &recordingCreds{TransportCredentials: r.TransportCredentials.Clone(), diag: r.diag}
}

type recordingConn struct {
	net.Conn
	diag *transportDiag
	once sync.Once
	read bool
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !c.read {
		c.once.Do(func() { c.diag.set(stageRead, err) })
	}
	if n > 0 {
		c.read = true
	}
	return n, err
}

// Package aegisctl is the operator's tool: it talks to aegis-controlplane
// over gRPC with mutual TLS exactly as the Aegis controller does (login,
// logout, sessions, stats, watch), reads the pinned maps directly on the
// gateway (local sessions|stats), and makes the certificates (certs).
package aegisctl

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/alecthomas/kong"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// CLI is aegisctl's command line.
type CLI struct {
	cli.Globals

	Login    LoginCmd    `cmd:"" help:"Grant a session, as the controller does after a user logs in."`
	Logout   LogoutCmd   `cmd:"" help:"Revoke one session, or every session of a user."`
	Sessions SessionsCmd `cmd:"" help:"List sessions (table, or --json)."`
	Stats    StatsCmd    `cmd:"" help:"Show the data path's verdict counters and map fill."`
	Watch    WatchCmd    `cmd:"" help:"Live view of counters and sessions, refreshed every --interval."`
	Local    LocalCmd    `cmd:"" help:"Read the pinned maps directly (on the gateway, as root): sessions, stats."`
	Certs    CertsCmd    `cmd:"" help:"Create a CA, the agent's server certificate and a controller client certificate."`
}

// Conn are the flags of the commands that call the control plane. The
// environment variables are AEGIS_CTL_*, not the control plane's AEGIS_TLS_*,
// so that a shell with the agent's environment does not hand aegisctl the
// server's certificate.
type Conn struct {
	Address    string        `short:"a" default:"localhost:50001" env:"AEGIS_CTL_ADDRESS" placeholder:"HOST:PORT" help:"Control plane address."`
	TLSCert    string        `name:"tls-cert" env:"AEGIS_CTL_TLS_CERT" placeholder:"FILE" help:"Client certificate (PEM) signed by the control plane's client CA."`
	TLSKey     string        `name:"tls-key" env:"AEGIS_CTL_TLS_KEY" placeholder:"FILE" help:"Client certificate's private key (PEM)."`
	TLSCA      string        `name:"tls-ca" env:"AEGIS_CTL_TLS_CA" placeholder:"FILE" help:"CA (PEM) that issued the agent's server certificate."`
	ServerName string        `default:"${server_name}" env:"AEGIS_CTL_SERVER_NAME" help:"Name to verify in the agent's certificate."`
	Insecure   bool          `env:"AEGIS_CTL_INSECURE" help:"Plaintext, for a control plane run with --insecure on loopback."`
	Timeout    time.Duration `default:"10s" env:"AEGIS_CTL_TIMEOUT" help:"Deadline of each call."`
}

// Main runs aegisctl with args and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	var c CLI
	return cli.Run(ctx, "aegisctl", "Operates an Aegis Agent: sessions, counters, certificates.",
		&c, &c.Globals, args, stdio,
		kong.Vars{"pin_path": state.DefaultPinPath, "server_name": pki.ServerName},
	)
}

// dial connects to the control plane. The connection is lazy: errors show
// on the first call.
func (c *Conn) dial() (*grpc.ClientConn, error) {
	var creds credentials.TransportCredentials
	if c.Insecure {
		creds = insecure.NewCredentials()
	} else {
		if c.TLSCert == "" || c.TLSKey == "" || c.TLSCA == "" {
			return nil, &cli.UsageError{Err: errors.New(
				"mutual TLS needs --tls-cert, --tls-key and --tls-ca (aegisctl certs makes them), or --insecure for a plaintext control plane on loopback")}
		}
		cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("load client certificate: %w", err)
		}
		caPEM, err := os.ReadFile(c.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("read CA: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("read CA %s: no PEM certificate in it", c.TLSCA)
		}
		creds = credentials.NewTLS(&tls.Config{
			MinVersion:   tls.VersionTLS12,
			ServerName:   c.ServerName,
			RootCAs:      roots,
			Certificates: []tls.Certificate{cert},
		})
	}
	conn, err := grpc.NewClient(c.Address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", c.Address, err)
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

package aegisctl

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
)

// CertsCmd is "aegisctl certs": the PKI of one gateway. It writes, all
// mode 0600:
//
//	ca.crt ca.key          the CA (keep ca.key offline once done)
//	server.crt server.key  the agent's certificate: SAN aegis-agent + --server-name/--server-ip
//	<client>.crt <client>.key  a client certificate for the controller (and aegisctl)
//
// An existing CA in the directory is reused, so running it again issues
// fresh server and client certificates under the same CA; --force
// replaces existing leaf certificates.
type CertsCmd struct {
	Dir          string        `default:"/etc/aegis/tls" placeholder:"DIR" help:"Directory to write into (created 0700 if missing)."`
	ServerName   []string      `placeholder:"NAME" help:"Extra DNS name for the server certificate (repeatable); aegis-agent is always in it."`
	ServerIP     []net.IP      `placeholder:"IP" help:"IP address for the server certificate (repeatable)."`
	Client       []string      `default:"aegis-controller" placeholder:"NAME" help:"Client certificate to issue (repeatable); the name is its CN and DNS SAN."`
	CALifetime   time.Duration `default:"87600h" help:"Lifetime of a new CA."`
	LeafLifetime time.Duration `default:"8760h" help:"Lifetime of the server and client certificates."`
	Force        bool          `help:"Replace existing server and client certificates."`
}

// checkClientName refuses a --client name that would write outside the
// directory or over the CA or server files, or that is not printable
// text: the name is logged as the peer of every call and becomes the user
// of the sessions the client grants through the compat API, which must
// be a valid user (state.ValidateUser, after the cut to 31 bytes).
func checkClientName(name string) error {
	switch {
	case strings.ContainsAny(name, `/\`) || name == "." || name == "..":
		return fmt.Errorf("--client %q: a name, not a path", name)
	case name == "ca" || name == "server":
		return fmt.Errorf("--client %q: the CA's and the server's files have that name", name)
	case !state.Printable(name) || strings.TrimSpace(name) != name:
		return fmt.Errorf("--client %q: want printable text without spaces at the ends", name)
	}
	return nil
}

// Run writes the certificates.
func (cmd *CertsCmd) Run(stdio cli.IO) error {
	if err := os.MkdirAll(cmd.Dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", cmd.Dir, err)
	}
	path := func(name string) string { return filepath.Join(cmd.Dir, name) }
	exists := func(name string) bool {
		_, err := os.Stat(path(name))
		return !errors.Is(err, fs.ErrNotExist)
	}

	var ca *pki.CA
	var err error
	switch {
	case exists("ca.crt") && exists("ca.key"):
		if ca, err = pki.LoadCA(path("ca.crt"), path("ca.key")); err != nil {
			return fmt.Errorf("reuse the CA in %s: %w", cmd.Dir, err)
		}
		fmt.Fprintf(stdio.Stdout, "using the existing CA %s\n", path("ca.crt"))
	case exists("ca.crt") || exists("ca.key"):
		return fmt.Errorf("%s has only half a CA (ca.crt or ca.key): restore the other or remove both", cmd.Dir)
	default:
		if ca, err = pki.NewCA("Aegis Agent CA", cmd.CALifetime); err != nil {
			return err
		}
		if err := ca.WriteFiles(path("ca.crt"), path("ca.key")); err != nil {
			return err
		}
		fmt.Fprintf(stdio.Stdout, "wrote %s, %s (new CA, valid until %s)\n", path("ca.crt"), path("ca.key"), ca.Cert.NotAfter.Format(time.DateOnly))
	}

	for _, name := range cmd.Client {
		if err := checkClientName(name); err != nil {
			return &cli.UsageError{Err: err}
		}
	}
	leaves := []string{"server"}
	leaves = append(leaves, cmd.Client...)
	if !cmd.Force {
		for _, l := range leaves {
			if exists(l+".crt") || exists(l+".key") {
				return fmt.Errorf("%s already exists: pass --force to replace it", path(l+".crt"))
			}
		}
	}
	server, err := ca.IssueServer(pki.ServerOptions{DNSNames: cmd.ServerName, IPs: cmd.ServerIP, Lifetime: cmd.LeafLifetime})
	if err != nil {
		return err
	}
	if err := server.WriteFiles(path("server.crt"), path("server.key")); err != nil {
		return err
	}
	fmt.Fprintf(stdio.Stdout, "wrote %s, %s (SAN %v %v)\n", path("server.crt"), path("server.key"), server.Cert.DNSNames, server.Cert.IPAddresses)
	for _, name := range cmd.Client {
		client, err := ca.IssueClient(name, cmd.LeafLifetime)
		if err != nil {
			return err
		}
		if err := client.WriteFiles(path(name+".crt"), path(name+".key")); err != nil {
			return err
		}
		fmt.Fprintf(stdio.Stdout, "wrote %s, %s (client %s)\n", path(name+".crt"), path(name+".key"), name)
	}
	return nil
}

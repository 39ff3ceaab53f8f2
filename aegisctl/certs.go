package aegisctl

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/pki"
)

// DefaultCertsDir is where the gateway keeps its certificates; the
// control plane's unit reads server.crt, server.key and ca.crt from it.
const DefaultCertsDir = "/etc/aegis/tls"

// CertsCmd is "aegisctl certs": the PKI of one gateway, one file pair per
// certificate in one directory:
//
//	ca.crt ca.key              the CA (keep ca.key offline once done)
//	server.crt server.key      the agent's certificate: DNS SAN aegis-agent, plus names and addresses given
//	NAME.crt NAME.key          a client certificate (a controller, an operator's aegisctl)
//
// Rules: no command overwrites an existing file without --force (renew
// replaces the one certificate it names, which is its purpose); every file
// is written 0600, atomically; the directory is created 0700, and one that
// others may read or enter is refused rather than silently tightened, so
// that an operator who widened it on purpose decides.
type CertsCmd struct {
	Dir string `default:"${certs_dir}" env:"AEGISCTL_CERTS_DIR" placeholder:"DIR" help:"Directory of the certificates (default ${default}); created 0700, refused if others may read it."`

	Init   CertsInitCmd   `cmd:"" help:"Create the CA (ca.crt, ca.key)."`
	Server CertsServerCmd `cmd:"" help:"Issue the agent's server certificate (server.crt, server.key) from the CA."`
	Client CertsClientCmd `cmd:"" help:"Issue client certificates (NAME.crt, NAME.key) from the CA; the CA and the server certificate are not touched."`
	List   CertsListCmd   `cmd:"" help:"List the certificates in the directory: subject, names, expiry, issuer, and whether each verifies against ca.crt."`
	Renew  CertsRenewCmd  `cmd:"" help:"Re-issue one certificate (server, or a client's NAME) with the same names, a new key and a new validity."`
}

// CertsInitCmd is "aegisctl certs init".
type CertsInitCmd struct {
	Name     string        `default:"Aegis Agent CA" help:"Common name of the CA."`
	Lifetime time.Duration `default:"87600h" help:"Lifetime of the CA."`
	Force    bool          `help:"Replace an existing CA: every certificate it issued stops verifying; re-issue them with renew."`
	JSON     bool          `name:"json" help:"Print JSON: the certificates written (file, key_file, subject, dns_names, ips, not_after, issuer)."`
}

// CertsServerCmd is "aegisctl certs server".
type CertsServerCmd struct {
	DNS      []string      `name:"dns" default:"${server_name}" placeholder:"NAME" help:"DNS names of the server certificate (repeatable; default ${default}); ${server_name}, which the controller verifies, is always one."`
	IP       []net.IP      `name:"ip" placeholder:"IP" help:"IP addresses of the server certificate (repeatable), for clients that verify the address they dial; none: a warning."`
	Lifetime time.Duration `default:"8760h" help:"Lifetime of the certificate."`
	Force    bool          `help:"Replace an existing server certificate."`
	JSON     bool          `name:"json" help:"Print JSON: the certificates written (file, key_file, subject, dns_names, ips, not_after, issuer)."`
}

// CertsClientCmd is "aegisctl certs client".
type CertsClientCmd struct {
	Names    []string      `arg:"" name:"name" help:"Name of the client (CN and DNS SAN; the files are NAME.crt, NAME.key); aegis-controlplane --allowed-client-name matches it."`
	Lifetime time.Duration `default:"8760h" help:"Lifetime of the certificates."`
	Force    bool          `help:"Replace an existing certificate of that name."`
	JSON     bool          `name:"json" help:"Print JSON: the certificates written (file, key_file, subject, dns_names, ips, not_after, issuer)."`
}

// CertsListCmd is "aegisctl certs list".
type CertsListCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

// CertsRenewCmd is "aegisctl certs renew".
type CertsRenewCmd struct {
	Name     string        `arg:"" help:"server, or a client's name."`
	Lifetime time.Duration `default:"8760h" help:"Lifetime of the new certificate."`
	JSON     bool          `name:"json" help:"Print JSON: the certificates written (file, key_file, subject, dns_names, ips, not_after, issuer)."`
}

// ErrCertsDir means the certificates' directory is unusable or unsafe.
var ErrCertsDir = errors.New("certificates directory")

// certsDir checks the directory, creating it 0700 if create and it is
// missing.
func certsDir(dir string, create bool) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) && create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		return nil
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w: %s does not exist: create the CA with aegisctl certs init", ErrCertsDir, dir)
	case err != nil:
		return fmt.Errorf("%w: %v", ErrCertsDir, err)
	case !fi.IsDir():
		return fmt.Errorf("%w: %s is not a directory", ErrCertsDir, dir)
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%w: %s has mode %04o: it holds private keys and must be 0700: chmod 0700 %s",
			ErrCertsDir, dir, fi.Mode().Perm(), dir)
	}
	return nil
}

func (c *CertsCmd) path(name string) string { return filepath.Join(c.Dir, name) }

func (c *CertsCmd) exists(name string) bool {
	_, err := os.Lstat(c.path(name))
	return !errors.Is(err, fs.ErrNotExist)
}

// refuseOverwrite fails if either file of the pair stem exists.
func (c *CertsCmd) refuseOverwrite(stem string, force bool) error {
	if force {
		return nil
	}
	for _, f := range []string{stem + ".crt", stem + ".key"} {
		if c.exists(f) {
			return fmt.Errorf("%s already exists: pass --force to replace it, or renew it (aegisctl certs renew %s)", c.path(f), stem)
		}
	}
	return nil
}

func (c *CertsCmd) loadCA() (*pki.CA, error) {
	if err := certsDir(c.Dir, false); err != nil {
		return nil, err
	}
	switch crt, key := c.exists("ca.crt"), c.exists("ca.key"); {
	case !crt && !key:
		return nil, fmt.Errorf("no CA in %s: create it with aegisctl certs init", c.Dir)
	case !crt || !key:
		return nil, fmt.Errorf("%s has only half a CA (ca.crt or ca.key): restore the other, or remove both and run aegisctl certs init", c.Dir)
	}
	ca, err := pki.LoadCA(c.path("ca.crt"), c.path("ca.key"))
	if err != nil {
		return nil, fmt.Errorf("load the CA in %s: %w", c.Dir, err)
	}
	return ca, nil
}

// WrittenCert is a certificate that init, server, client or renew wrote,
// as their --json prints it (a list): the fields of certs list --json.
type WrittenCert struct {
	File     string    `json:"file"`
	KeyFile  string    `json:"key_file"`
	Subject  string    `json:"subject"`
	DNSNames []string  `json:"dns_names,omitempty"`
	IPs      []string  `json:"ips,omitempty"`
	NotAfter time.Time `json:"not_after"`
	Issuer   string    `json:"issuer"`
}

// write writes the pair stem and says so, unless asJSON: then it only
// returns what it wrote, for the caller to print.
func (c *CertsCmd) write(stdio cli.IO, asJSON bool, stem string, p *pki.Pair, what string) (WrittenCert, error) {
	w := WrittenCert{File: c.path(stem + ".crt"), KeyFile: c.path(stem + ".key"), Subject: p.Cert.Subject.CommonName,
		DNSNames: p.Cert.DNSNames, NotAfter: p.Cert.NotAfter.UTC(), Issuer: p.Cert.Issuer.CommonName}
	for _, ip := range p.Cert.IPAddresses {
		w.IPs = append(w.IPs, ip.String())
	}
	if err := p.WriteFiles(w.File, w.KeyFile); err != nil {
		return w, err
	}
	if !asJSON {
		fmt.Fprintf(stdio.Stdout, "wrote %s, %s (%s; valid until %s)\n", w.File, w.KeyFile, what, w.NotAfter.Format(time.DateOnly))
	}
	return w, nil
}

// written prints what was written, with --json.
func written(stdio cli.IO, asJSON bool, ws ...WrittenCert) error {
	if !asJSON {
		return nil
	}
	return writeJSON(stdio.Stdout, ws)
}

func sans(c *x509.Certificate) string {
	var parts []string
	if len(c.DNSNames) > 0 {
		parts = append(parts, "DNS "+strings.Join(c.DNSNames, ","))
	}
	if len(c.IPAddresses) > 0 {
		ips := make([]string, len(c.IPAddresses))
		for i, ip := range c.IPAddresses {
			ips[i] = ip.String()
		}
		parts = append(parts, "IP "+strings.Join(ips, ","))
	}
	if len(parts) == 0 {
		return "no SAN"
	}
	return strings.Join(parts, "; ")
}

// Run creates the CA.
func (cmd *CertsInitCmd) Run(c *CertsCmd, stdio cli.IO) error {
	if err := certsDir(c.Dir, true); err != nil {
		return err
	}
	if err := c.refuseOverwrite("ca", cmd.Force); err != nil {
		return err
	}
	ca, err := pki.NewCA(cmd.Name, cmd.Lifetime)
	if err != nil {
		return err
	}
	w, err := c.write(stdio, cmd.JSON, "ca", &ca.Pair, "CA "+cmd.Name)
	if err != nil {
		return err
	}
	return written(stdio, cmd.JSON, w)
}

// Run issues the server certificate.
func (cmd *CertsServerCmd) Run(c *CertsCmd, stdio cli.IO) error {
	ca, err := c.loadCA()
	if err != nil {
		return err
	}
	if err := c.refuseOverwrite("server", cmd.Force); err != nil {
		return err
	}
	p, err := ca.IssueServer(pki.ServerOptions{DNSNames: cmd.DNS, IPs: cmd.IP, Lifetime: cmd.Lifetime})
	if err != nil {
		return err
	}
	w, err := c.write(stdio, cmd.JSON, "server", p, "server, "+sans(p.Cert))
	if err != nil {
		return err
	}
	if len(cmd.IP) == 0 {
		fmt.Fprintf(stdio.Stderr, "aegisctl: warning: the server certificate has no IP address: clients must verify the name %s (the controller and aegisctl do); add --ip ADDR for clients that verify the address they dial\n", pki.ServerName)
	}
	return written(stdio, cmd.JSON, w)
}

// clientName is what a client's name may be: it becomes a file name.
var clientName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func checkClientName(n string) error {
	if !clientName.MatchString(n) || n == "ca" || n == "server" {
		return &cli.UsageError{Err: fmt.Errorf("client name %q: want letters, digits, '.', '_' or '-' (at most 64, not ca or server)", n)}
	}
	return nil
}

// Run issues client certificates.
func (cmd *CertsClientCmd) Run(c *CertsCmd, stdio cli.IO) error {
	for _, n := range cmd.Names {
		if err := checkClientName(n); err != nil {
			return err
		}
	}
	ca, err := c.loadCA()
	if err != nil {
		return err
	}
	for _, n := range cmd.Names {
		if err := c.refuseOverwrite(n, cmd.Force); err != nil {
			return err
		}
	}
	var ws []WrittenCert
	for _, n := range cmd.Names {
		p, err := ca.IssueClient(n, cmd.Lifetime)
		if err != nil {
			return err
		}
		w, err := c.write(stdio, cmd.JSON, n, p, "client "+n)
		if err != nil {
			return err
		}
		ws = append(ws, w)
	}
	return written(stdio, cmd.JSON, ws...)
}

// Run renews one certificate.
func (cmd *CertsRenewCmd) Run(c *CertsCmd, stdio cli.IO) error {
	if cmd.Name != "server" {
		if err := checkClientName(cmd.Name); err != nil {
			return err
		}
	}
	ca, err := c.loadCA()
	if err != nil {
		return err
	}
	data, err := os.ReadFile(c.path(cmd.Name + ".crt"))
	if err != nil {
		return fmt.Errorf("renew %s: %w", cmd.Name, err)
	}
	old, err := pki.ParseCertificatePEM(data)
	if err != nil {
		return fmt.Errorf("renew %s: %w", c.path(cmd.Name+".crt"), err)
	}
	p, err := ca.Renew(old, cmd.Lifetime)
	if err != nil {
		return err
	}
	w, err := c.write(stdio, cmd.JSON, cmd.Name, p, "renewed with a new key, "+sans(p.Cert))
	if err != nil {
		return err
	}
	return written(stdio, cmd.JSON, w)
}

// CertInfo is one certificate as certs list shows it.
type CertInfo struct {
	File     string    `json:"file"`
	Subject  string    `json:"subject"`
	DNSNames []string  `json:"dns_names,omitempty"`
	IPs      []string  `json:"ips,omitempty"`
	NotAfter time.Time `json:"not_after"`
	Issuer   string    `json:"issuer"`
	// Status is "ok", or what is wrong: "expired", "not yet valid", "not
	// issued by ca.crt", "no key", "key does not match", "expires in N
	// days" (under 30).
	Status   string `json:"status"`
	Verifies bool   `json:"verifies"`
}

// Run lists the certificates.
func (cmd *CertsListCmd) Run(c *CertsCmd, stdio cli.IO) error {
	infos, err := listCerts(c, time.Now())
	if err != nil {
		return err
	}
	if cmd.JSON {
		return writeJSON(stdio.Stdout, infos)
	}
	return writeCerts(stdio.Stdout, infos)
}

func listCerts(c *CertsCmd, now time.Time) ([]CertInfo, error) {
	if err := certsDir(c.Dir, false); err != nil {
		return nil, err
	}
	files, err := filepath.Glob(c.path("*.crt"))
	if err != nil {
		return nil, err
	}
	slices.SortFunc(files, func(a, b string) int {
		// The CA first, then the server, then the clients by name.
		rank := func(f string) string {
			switch filepath.Base(f) {
			case "ca.crt":
				return "0"
			case "server.crt":
				return "1"
			}
			return "2" + f
		}
		return strings.Compare(rank(a), rank(b))
	})
	var ca *pki.CA
	if c.exists("ca.crt") && c.exists("ca.key") {
		ca, _ = pki.LoadCA(c.path("ca.crt"), c.path("ca.key"))
	}
	infos := []CertInfo{}
	for _, f := range files {
		info := CertInfo{File: filepath.Base(f)}
		data, err := os.ReadFile(f)
		if err == nil {
			var cert *x509.Certificate
			if cert, err = pki.ParseCertificatePEM(data); err == nil {
				info = describeCert(c, info, cert, ca, now)
			}
		}
		if err != nil {
			info.Status = err.Error()
		}
		infos = append(infos, info)
	}
	return infos, nil
}

func describeCert(c *CertsCmd, info CertInfo, cert *x509.Certificate, ca *pki.CA, now time.Time) CertInfo {
	info.Subject = cert.Subject.CommonName
	info.DNSNames = cert.DNSNames
	for _, ip := range cert.IPAddresses {
		info.IPs = append(info.IPs, ip.String())
	}
	info.NotAfter = cert.NotAfter.UTC()
	info.Issuer = cert.Issuer.CommonName
	if ca != nil && cert.CheckSignatureFrom(ca.Cert) == nil {
		info.Issuer = "ca.crt"
	}
	if cert.Equal(caCert(ca)) {
		info.Issuer = "self (the CA)"
	}
	stem := strings.TrimSuffix(info.File, ".crt")
	switch {
	case now.After(cert.NotAfter):
		info.Status = "expired"
	case now.Before(cert.NotBefore):
		info.Status = "not yet valid"
	case ca == nil:
		info.Status = "no CA to verify against"
	default:
		if err := ca.Verify(cert); err != nil {
			var unknown x509.UnknownAuthorityError
			if errors.As(err, &unknown) {
				info.Status = "not issued by ca.crt"
			} else {
				info.Status = err.Error()
			}
			break
		}
		info.Verifies = true
		info.Status = "ok"
		if left := cert.NotAfter.Sub(now); left < 30*24*time.Hour {
			info.Status = fmt.Sprintf("expires in %d days", int(left.Hours()/24))
		}
	}
	if _, err := pki.LoadPair(c.path(info.File), c.path(stem+".key")); err != nil {
		info.Verifies = false
		if errors.Is(err, fs.ErrNotExist) {
			info.Status += ", no key"
		} else {
			info.Status += ", key does not match"
		}
	}
	return info
}

func caCert(ca *pki.CA) *x509.Certificate {
	if ca == nil {
		return nil
	}
	return ca.Cert
}

func writeCerts(w io.Writer, infos []CertInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FILE\tSUBJECT\tNAMES\tNOT AFTER\tISSUER\tSTATUS")
	for _, i := range infos {
		names := slices.Concat(i.DNSNames, i.IPs)
		n := strings.Join(names, ",")
		if n == "" {
			n = "-"
		}
		na := "-"
		if !i.NotAfter.IsZero() {
			na = i.NotAfter.Format(time.DateOnly)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", i.File, i.Subject, n, na, i.Issuer, i.Status)
	}
	return tw.Flush()
}

package testutil

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/pki"
)

// EtcdBinary is the etcd server the harness runs: Debian's etcd-server
// package (3.4), which scripts/setup.sh installs. The package also starts
// a system instance on 127.0.0.1:2379; setup disables it, and the harness
// never talks to it: its members listen on the addresses a test gives, or
// on free loopback ports.
const EtcdBinary = "/usr/bin/etcd"

// Default member ports inside a test's own network namespace, where the
// address is the test's and nothing else listens.
const (
	EtcdClientPort = 2379
	EtcdPeerPort   = 2380
)

// EtcdClientName is the common name of the client certificate ClientTLS
// returns.
const EtcdClientName = "aegis-store-client"

// EtcdMember is where one member runs.
type EtcdMember struct {
	// Netns is the member's network namespace; nil for the test
	// process's own, where the member takes free ports on IP (which
	// should then be a loopback address).
	Netns *Netns
	// IP is the address the member listens on for clients and peers.
	IP netip.Addr
	// ClientPort and PeerPort; 0 for EtcdClientPort and EtcdPeerPort in
	// a namespace, for free ports otherwise.
	ClientPort, PeerPort uint16
}

// EtcdOptions tune a cluster. The zero value is etcd's defaults.
type EtcdOptions struct {
	// HeartbeatInterval and ElectionTimeout are raft's timing; 0 for
	// etcd's defaults (100 ms and 1 s). Tests on a loaded machine keep
	// the defaults: a shorter election timeout turns scheduling delays
	// into leader changes.
	HeartbeatInterval, ElectionTimeout time.Duration
	// DataDir is where the members' data directories are made; "" for
	// t.TempDir(). Benchmarks that want etcd's own disk out of the figure
	// give a tmpfs (/dev/shm): a member fsyncs its log on every commit.
	DataDir string
}

// Etcd is a running etcd cluster of child processes with mutual TLS on
// the client and the peer side, all certificates from one test CA.
type Etcd struct {
	t       testing.TB
	opts    EtcdOptions
	token   string
	tlsDir  string
	ca      *pki.CA
	members []*etcdProc
}

type etcdProc struct {
	EtcdMember
	name    string
	dataDir string
	out     *Buffer
	cmd     *exec.Cmd
	exited  chan error
	mu      sync.Mutex // guards cmd and exited across Kill and Restart
	running bool
}

// StartEtcd starts one member per entry of members as a new cluster and
// waits until it is healthy. Members are stopped (SIGKILL) and their data
// removed when t ends; their output is logged if t failed.
func StartEtcd(t testing.TB, members []EtcdMember) *Etcd {
	t.Helper()
	return StartEtcdOptions(t, members, EtcdOptions{})
}

// StartEtcdOptions is StartEtcd with tuning.
func StartEtcdOptions(t testing.TB, members []EtcdMember, opts EtcdOptions) *Etcd {
	t.Helper()
	if len(members) == 0 {
		t.Fatal("start etcd: no members")
	}
	if _, err := os.Stat(EtcdBinary); err != nil {
		t.Fatalf("start etcd: %v (Debian package etcd-server; scripts/setup.sh installs it)", err)
	}
	e := &Etcd{t: t, opts: opts, token: RandomName("aegis-test-")}
	// The TLS files live outside t.TempDir (whose parent is private to
	// root), readable by everyone but for the keys: e2e tests run the
	// daemons as an unprivileged user and hand it the client files.
	dir, err := os.MkdirTemp("", "aegis-etcd-tls-")
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	e.tlsDir = dir
	if e.ca, err = pki.NewCA("aegis test etcd CA", 24*time.Hour); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	if err := pki.WriteFile(e.file("ca.crt"), e.ca.CertPEM); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	if err := os.Chmod(e.file("ca.crt"), 0o644); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	cli, err := e.ca.IssueClient(EtcdClientName, 24*time.Hour)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	if err := cli.WriteFiles(e.file("client.crt"), e.file("client.key")); err != nil {
		t.Fatalf("start etcd: %v", err)
	}

	data := t.TempDir()
	if opts.DataDir != "" {
		if data, err = os.MkdirTemp(opts.DataDir, "aegis-etcd-data-"); err != nil {
			t.Fatalf("start etcd: %v", err)
		}
		t.Cleanup(func() { os.RemoveAll(data) })
	}
	for i, m := range members {
		if !m.IP.IsValid() {
			t.Fatalf("start etcd: member %d has no address", i)
		}
		p := &etcdProc{EtcdMember: m, name: "m" + strconv.Itoa(i), out: &Buffer{}}
		p.dataDir = filepath.Join(data, p.name)
		if p.ClientPort == 0 {
			p.ClientPort = e.defaultPort(m, EtcdClientPort)
		}
		if p.PeerPort == 0 {
			p.PeerPort = e.defaultPort(m, EtcdPeerPort)
		}
		if err := e.writeMemberCert(p); err != nil {
			t.Fatalf("start etcd: %v", err)
		}
		e.members = append(e.members, p)
	}
	t.Cleanup(func() {
		for i, p := range e.members {
			e.stop(p)
			if t.Failed() {
				t.Logf("etcd member %d (%s, %s) output:\n%s", i, p.name, p.clientURL(), p.out.String())
			}
		}
	})
	for i := range e.members {
		if err := e.start(i); err != nil {
			t.Fatalf("start etcd member %d: %v", i, err)
		}
	}
	e.WaitHealthy(t)
	return e
}

// StartEtcdLocal starts a one-member cluster on free ports of 127.0.0.1 in
// the test process's own network namespace, for unit tests of code that
// talks to etcd; it needs neither root nor namespaces.
func StartEtcdLocal(t testing.TB) *Etcd {
	t.Helper()
	return StartEtcd(t, []EtcdMember{{IP: netip.MustParseAddr("127.0.0.1")}})
}

// StartEtcdIn starts a one-member cluster on ip inside ns.
func StartEtcdIn(t testing.TB, ns *Netns, ip netip.Addr) *Etcd {
	t.Helper()
	return StartEtcd(t, []EtcdMember{{Netns: ns, IP: ip}})
}

// defaultPort is port inside a namespace, or a port free right now on
// the member's address in the test's own namespace. Another process may
// take it before etcd binds; then the member fails to start, loudly.
func (e *Etcd) defaultPort(m EtcdMember, port uint16) uint16 {
	e.t.Helper()
	if m.Netns != nil {
		return port
	}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(m.IP, 0).String())
	if err != nil {
		e.t.Fatalf("start etcd: find a free port on %s: %v", m.IP, err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// writeMemberCert issues the member's certificate. etcd 3.4 uses one
// certificate for both ends of a peer connection and for its own gateway's
// connections to itself, so it is a server and a client certificate at
// once; the CA issues that through Renew of a template with both usages.
func (e *Etcd) writeMemberCert(p *etcdProc) error {
	srv, err := e.ca.IssueServer(pki.ServerOptions{DNSNames: []string{"localhost"}, IPs: []net.IP{p.IP.AsSlice()}, Lifetime: 24 * time.Hour})
	if err != nil {
		return err
	}
	tmpl := *srv.Cert
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	both, err := e.ca.Renew(&tmpl, 24*time.Hour)
	if err != nil {
		return err
	}
	return both.WriteFiles(e.file(p.name+".crt"), e.file(p.name+".key"))
}

func (e *Etcd) file(name string) string { return filepath.Join(e.tlsDir, name) }

func (p *etcdProc) clientURL() string {
	return "https://" + netip.AddrPortFrom(p.IP, p.ClientPort).String()
}

func (p *etcdProc) peerURL() string {
	return "https://" + netip.AddrPortFrom(p.IP, p.PeerPort).String()
}

func (e *Etcd) args(p *etcdProc) []string {
	var cluster []string
	for _, m := range e.members {
		cluster = append(cluster, m.name+"="+m.peerURL())
	}
	args := []string{
		"--name", p.name,
		"--data-dir", p.dataDir,
		"--listen-client-urls", p.clientURL(),
		"--advertise-client-urls", p.clientURL(),
		"--listen-peer-urls", p.peerURL(),
		"--initial-advertise-peer-urls", p.peerURL(),
		// Ignored once the data directory exists: a restarted member
		// rejoins with what it stored.
		"--initial-cluster", strings.Join(cluster, ","),
		"--initial-cluster-state", "new",
		"--initial-cluster-token", e.token,
		"--cert-file", e.file(p.name + ".crt"), "--key-file", e.file(p.name + ".key"),
		"--trusted-ca-file", e.file("ca.crt"), "--client-cert-auth",
		"--peer-cert-file", e.file(p.name + ".crt"), "--peer-key-file", e.file(p.name + ".key"),
		"--peer-trusted-ca-file", e.file("ca.crt"), "--peer-client-cert-auth",
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "error",
	}
	if d := e.opts.HeartbeatInterval; d > 0 {
		args = append(args, "--heartbeat-interval", strconv.FormatInt(d.Milliseconds(), 10))
	}
	if d := e.opts.ElectionTimeout; d > 0 {
		args = append(args, "--election-timeout", strconv.FormatInt(d.Milliseconds(), 10))
	}
	return args
}

func (e *Etcd) start(i int) error {
	p := e.members[i]
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		return fmt.Errorf("member %d is running", i)
	}
	var cmd *exec.Cmd
	if p.Netns != nil {
		cmd = p.Netns.Command(EtcdBinary, e.args(p)...)
	} else {
		cmd = exec.Command(EtcdBinary, e.args(p)...)
	}
	// The environment is etcd's second configuration source: keep a
	// caller's ETCD_* variables from changing the members.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	fmt.Fprintf(p.out, "--- start %s\n", time.Now().Format(time.RFC3339Nano))
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	p.cmd, p.exited, p.running = cmd, exited, true
	return nil
}

// stop kills the member if it runs and waits for it. nsenter execs etcd,
// so the process is etcd itself.
func (e *Etcd) stop(p *etcdProc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.running {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
	p.running = false
}

// Len is the number of members.
func (e *Etcd) Len() int { return len(e.members) }

// Kill ends member i with SIGKILL, as a crash or a power cut would, and
// waits until it is gone. Its data directory stays for Restart.
func (e *Etcd) Kill(i int) {
	e.t.Helper()
	p := e.member(i)
	p.mu.Lock()
	running := p.running
	p.mu.Unlock()
	if !running {
		e.t.Fatalf("kill etcd member %d: not running", i)
	}
	e.stop(p)
	fmt.Fprintf(p.out, "--- killed %s\n", time.Now().Format(time.RFC3339Nano))
}

// Restart starts member i again on its data directory: it rejoins the
// cluster as the member it was. It does not wait; use WaitHealthy.
func (e *Etcd) Restart(i int) {
	e.t.Helper()
	e.member(i)
	if err := e.start(i); err != nil {
		e.t.Fatalf("restart etcd member %d: %v", i, err)
	}
}

// Running reports whether member i's process runs.
func (e *Etcd) Running(i int) bool {
	p := e.member(i)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		select {
		case err := <-p.exited:
			p.exited <- err
			return false
		default:
		}
	}
	return p.running
}

func (e *Etcd) member(i int) *etcdProc {
	e.t.Helper()
	if i < 0 || i >= len(e.members) {
		e.t.Fatalf("etcd member %d of %d", i, len(e.members))
	}
	return e.members[i]
}

// Endpoints are the members' client URLs (https://IP:PORT), in member
// order, whether they run or not.
func (e *Etcd) Endpoints() []string {
	var out []string
	for _, p := range e.members {
		out = append(out, p.clientURL())
	}
	return out
}

// StoreFlag is the aegis daemons' --store value for the cluster.
func (e *Etcd) StoreFlag() string { return "etcd:" + strings.Join(e.Endpoints(), ",") }

// ClientTLS returns the files a client needs: the CA that signed the
// members' certificates, and a client certificate (EtcdClientName) with
// its key. The CA and the certificate are world-readable, the key is 0600
// root's; see ChownClientKey.
func (e *Etcd) ClientTLS() (ca, cert, key string) {
	return e.file("ca.crt"), e.file("client.crt"), e.file("client.key")
}

// ChownClientKey hands the client key (and certificate) to uid:gid, for
// daemons that run unprivileged.
func (e *Etcd) ChownClientKey(t testing.TB, uid, gid int) {
	t.Helper()
	for _, f := range []string{"client.crt", "client.key"} {
		if err := os.Chown(e.file(f), uid, gid); err != nil {
			t.Fatalf("chown etcd client files: %v", err)
		}
	}
}

// CA is the cluster's certificate authority, to issue more client
// certificates (with names a test chooses) or to compare against.
func (e *Etcd) CA() *pki.CA { return e.ca }

// ClientConfig is a TLS configuration for a client of the cluster, with
// the ClientTLS certificate.
func (e *Etcd) ClientConfig() *tls.Config {
	e.t.Helper()
	pair, err := pki.LoadPair(e.file("client.crt"), e.file("client.key"))
	if err != nil {
		e.t.Fatalf("etcd client certificate: %v", err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		e.t.Fatalf("etcd client certificate: %v", err)
	}
	return &tls.Config{RootCAs: e.ca.CertPool(), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

// Dial connects to addr from member i's network namespace (or the test's
// own), as clients in that namespace would.
func (e *Etcd) Dial(ctx context.Context, i int, addr string) (net.Conn, error) {
	p := e.member(i)
	if p.Netns == nil {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	var c net.Conn
	err := p.Netns.Do(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// httpClient talks to member i over its client URL with the client
// certificate, from the member's namespace.
func (e *Etcd) httpClient(i int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:   e.ClientConfig(),
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return e.Dial(ctx, i, addr)
		},
	}}
}

// Healthy asks member i's /health endpoint, which answers true only when
// the member has a leader and a quorum read through raft succeeds. It
// returns nil for healthy, and why not otherwise.
func (e *Etcd) Healthy(ctx context.Context, i int) error {
	p := e.member(i)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.clientURL()+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := e.httpClient(i).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var h struct {
		Health string `json:"health"`
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return fmt.Errorf("health of member %d: %s: %q", i, resp.Status, body)
	}
	if h.Health != "true" {
		return fmt.Errorf("health of member %d: %s", i, body)
	}
	return nil
}

// WaitHealthy waits up to 30 s until every running member reports healthy,
// and fails t otherwise. Members that were killed are not asked.
func (e *Etcd) WaitHealthy(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for i := range e.members {
		for {
			if !e.Running(i) {
				p := e.members[i]
				p.mu.Lock()
				crashed := p.running
				p.mu.Unlock()
				if crashed {
					t.Fatalf("etcd member %d exited:\n%s", i, p.out.String())
				}
				break
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err := e.Healthy(ctx, i)
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("etcd member %d not healthy after 30 s: %v\n%s", i, err, e.members[i].out.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// ErrEtcdRequest is returned by Put and Get for a request etcd answered
// with an error.
var ErrEtcdRequest = errors.New("etcd request failed")

// Put writes key=value through member i's JSON gateway (/v3/kv/put), so
// that tests of the cluster itself need no client library.
func (e *Etcd) Put(ctx context.Context, i int, key, value string) error {
	_, err := e.gateway(ctx, i, "/v3/kv/put", map[string]string{
		"key": base64.StdEncoding.EncodeToString([]byte(key)), "value": base64.StdEncoding.EncodeToString([]byte(value))})
	return err
}

// Get reads key through member i with a linearizable read; ok is false
// when the key does not exist.
func (e *Etcd) Get(ctx context.Context, i int, key string) (value string, ok bool, err error) {
	body, err := e.gateway(ctx, i, "/v3/kv/range", map[string]string{"key": base64.StdEncoding.EncodeToString([]byte(key))})
	if err != nil {
		return "", false, err
	}
	var r struct {
		Kvs []struct {
			Value string `json:"value"`
		} `json:"kvs"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return "", false, fmt.Errorf("decode range response: %w", err)
	}
	if len(r.Kvs) == 0 {
		return "", false, nil
	}
	v, err := base64.StdEncoding.DecodeString(r.Kvs[0].Value)
	if err != nil {
		return "", false, fmt.Errorf("decode range response: %w", err)
	}
	return string(v), true, nil
}

func (e *Etcd) gateway(ctx context.Context, i int, path string, req any) ([]byte, error) {
	p := e.member(i)
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, p.clientURL()+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := e.httpClient(i).Do(hr)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: %s %s: %s", ErrEtcdRequest, path, resp.Status, bytes.TrimSpace(body))
	}
	return body, nil
}

// Metrics returns member i's Prometheus metrics (/metrics on its client
// URL), for benchmarks that count the requests a workload makes.
func (e *Etcd) Metrics(ctx context.Context, i int) (string, error) {
	p := e.member(i)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.clientURL()+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := e.httpClient(i).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%w: /metrics: %s", ErrEtcdRequest, resp.Status)
	}
	return string(body), nil
}

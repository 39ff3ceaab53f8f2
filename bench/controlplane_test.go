package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// Sizes of one round of each case.
const (
	cpRounds       = 5
	unaryC1Calls   = 2_000
	unaryC16Calls  = 20_000
	unaryC16       = 16
	streamGrants   = 100_000
	nftRounds      = 3
	nftSingleCalls = 300 // nft add element, one process each
)

// cpServer is the real aegis-controlplane binary, built for the run and
// started as the daemon runs (mutual TLS with an allowlist, metrics on,
// the audit log written line by line to a file as it would go to
// journald's pipe), on loopback, over pinned maps of a million sessions
// per family. The benchmark's client runs in this process.
type cpServer struct {
	addr string
	ca   *pki.CA
	cert tls.Certificate
	maps *state.Maps
}

func startCPServer(b *testing.B) *cpServer {
	b.Helper()
	return startCPServerWith(b, 1<<20, nil)
}

// startCPServerWith is startCPServer over maps of the given capacity, with
// extra command-line arguments; fill runs on the pins before the daemon
// starts.
func startCPServerWith(b *testing.B, capacity uint32, fill func(pin string), args ...string) *cpServer {
	b.Helper()
	pin := tu.PinDir(b)
	tu.PinMaps(b, pin, tu.PinOptions{Capacity: capacity})
	if fill != nil {
		fill(pin)
	}
	dir := b.TempDir()
	build := exec.Command("go", "build", "-o", dir, "./cmd/aegis-controlplane")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build aegis-controlplane: %v\n%s", err, out)
	}
	ca, err := pki.NewCA("bench CA", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	srv, _ := ca.IssueServer(pki.ServerOptions{})
	if err := srv.WriteFiles(filepath.Join(dir, "s.crt"), filepath.Join(dir, "s.key")); err != nil {
		b.Fatal(err)
	}
	if err := pki.WriteFile(filepath.Join(dir, "ca.crt"), ca.CertPEM); err != nil {
		b.Fatal(err)
	}
	logFile, err := os.Create(filepath.Join(dir, "controlplane.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	metrics, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	metricsAddr := metrics.Addr().String()
	metrics.Close()
	cmd := exec.Command(filepath.Join(dir, "aegis-controlplane"), "--listen-address", "127.0.0.1", "-g", strconv.Itoa(port),
		"--tls-cert", filepath.Join(dir, "s.crt"), "--tls-key", filepath.Join(dir, "s.key"), "--tls-client-ca", filepath.Join(dir, "ca.crt"),
		"--allowed-client-name", "controller", "--metrics-address", metricsAddr, "--pin-path", pin, "--log-format", "json")
	cmd.Args = append(cmd.Args, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			b.Errorf("aegis-controlplane: %v", err)
		}
	})
	cli, _ := ca.IssueClient("controller", time.Hour)
	cert, err := cli.TLSCertificate()
	if err != nil {
		b.Fatal(err)
	}
	m, err := state.Open(pin, state.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	s := &cpServer{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), ca: ca, cert: cert, maps: m}

	health := healthpb.NewHealthClient(s.conn(b))
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		r, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "aegis.agent.v1.AgentService"})
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logFile.Name())
			b.Fatalf("aegis-controlplane not serving after 10 s: %v %v\n%s", r, err, log)
		}
	}
	return s
}

func (s *cpServer) conn(b *testing.B) *grpc.ClientConn {
	b.Helper()
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName: pki.ServerName, RootCAs: s.ca.CertPool(), Certificates: []tls.Certificate{s.cert}})))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return conn
}

// client opens one connection, as the controller keeps one.
func (s *cpServer) client(b *testing.B) agentv1.AgentServiceClient {
	b.Helper()
	return agentv1.NewAgentServiceClient(s.conn(b))
}

// sessionAddrs returns the i-th distinct (source, destination, port) of
// the benchmark: sources in 10.0.0.0/8 (never routed: the maps are not
// attached to anything), destinations in 198.51.100.0/24.
func sessionAddrs(i int) (src, dst netip.Addr, port uint16) {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%4)}), uint16(1024 + i%50000)
}

func loginReq(i int) *agentv1.LoginEventRequest {
	src, dst, port := sessionAddrs(i)
	return &agentv1.LoginEventRequest{User: "bench", SrcIp: src.String(), DstIp: dst.String(), DstPort: uint32(port),
		Protocol: agentv1.Protocol_PROTOCOL_TCP}
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

// unaryC1 grants n sessions one after the other and returns the latencies.
func unaryC1(b *testing.B, c agentv1.AgentServiceClient, first, n int) []time.Duration {
	lat := make([]time.Duration, n)
	ctx := context.Background()
	for i := range n {
		req := loginReq(first + i)
		start := time.Now()
		if _, err := c.LoginEvent(ctx, req); err != nil {
			b.Fatal(err)
		}
		lat[i] = time.Since(start)
	}
	slices.Sort(lat)
	return lat
}

// unaryParallel grants n sessions from conc goroutines and returns the
// grants per second.
func unaryParallel(b *testing.B, c agentv1.AgentServiceClient, first, n, conc int) float64 {
	reqs := make([]*agentv1.LoginEventRequest, n)
	for i := range reqs {
		reqs[i] = loginReq(first + i)
	}
	var wg sync.WaitGroup
	errs := make(chan error, conc)
	start := time.Now()
	for w := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += conc {
				if _, err := c.LoginEvent(context.Background(), reqs[i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	return float64(n) / elapsed.Seconds()
}

// streamed grants n sessions on one StreamLoginEvents call and returns the
// grants per second, counted until the server's reply.
func streamed(b *testing.B, c agentv1.AgentServiceClient, first, n int) float64 {
	reqs := make([]*agentv1.LoginEventRequest, n)
	for i := range reqs {
		reqs[i] = loginReq(first + i)
	}
	start := time.Now()
	stream, err := c.StreamLoginEvents(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			b.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	elapsed := time.Since(start)
	if err != nil {
		b.Fatal(err)
	}
	if resp.GetApplied() != uint64(n) {
		b.Fatalf("stream applied %d of %d: %v", resp.GetApplied(), n, resp.GetRejections())
	}
	return float64(n) / elapsed.Seconds()
}

// nftSet creates, in a namespace of its own, an nftables set keyed like
// Aegis's sessions (ip saddr . ip daddr . th dport) and a rule using it.
func nftSet(b *testing.B) *tu.Netns {
	b.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		b.Fatal("nft not installed (Debian package nftables; make setup installs it)")
	}
	ns := tu.NewNetns(b, "aegis-bench-nft-")
	ruleset := `table inet aegis {
	set sessions {
		type ipv4_addr . ipv4_addr . inet_service
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ip saddr . ip daddr . th dport @sessions accept
	}
}
`
	nftFile(b, ns, ruleset)
	return ns
}

func nftFile(b *testing.B, ns *tu.Netns, content string) time.Duration {
	b.Helper()
	f := filepath.Join(b.TempDir(), "nft")
	if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
		b.Fatal(err)
	}
	return nftMust(b, ns, "-f", f)
}

func nftMust(b *testing.B, ns *tu.Netns, args ...string) time.Duration {
	b.Helper()
	d, err := nftRun(ns, args...)
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// nftRun runs nft inside ns, forked from a thread in the namespace (no
// nsenter in between), and returns its wall time.
func nftRun(ns *tu.Netns, args ...string) (time.Duration, error) {
	var d time.Duration
	err := ns.Do(func() error {
		start := time.Now()
		out, err := exec.Command("nft", args...).CombinedOutput()
		d = time.Since(start)
		if err != nil {
			return fmt.Errorf("nft %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	})
	return d, err
}

func nftElement(i int) string {
	src, dst, port := sessionAddrs(i)
	return fmt.Sprintf("%s . %s . %d", src, dst, port)
}

// BenchmarkControlPlane measures grants through the aegis-controlplane
// binary over mutual TLS on loopback (client and server share the
// machine's cores)
// beside nftables as the baseline, in one run: unary LoginEvent latency
// at concurrency 1 against one `nft add element` process per element,
// unary throughput at concurrency 16 against the same, and
// StreamLoginEvents against one `nft -f` batch of as many elements.
// Rounds alternate and the medians are reported.
//
//	go test -run '^$' -bench ControlPlane -benchtime 1x ./bench/
func BenchmarkControlPlane(b *testing.B) {
	tu.RequireKernel(b)
	srv := startCPServer(b)
	client := srv.client(b)
	ns := nftSet(b)

	next := 0
	take := func(n int) int { first := next; next += n; return first }
	// Warm up: connection, TLS, code paths.
	unaryC1(b, client, take(200), 200)

	var p50, p99, c16, stream []float64
	for range cpRounds {
		lat := unaryC1(b, client, take(unaryC1Calls), unaryC1Calls)
		p50 = append(p50, float64(percentile(lat, 0.50).Microseconds()))
		p99 = append(p99, float64(percentile(lat, 0.99).Microseconds()))
		c16 = append(c16, unaryParallel(b, client, take(unaryC16Calls), unaryC16Calls, unaryC16))
		stream = append(stream, streamed(b, client, take(streamGrants), streamGrants))
	}
	if v4, _, err := srv.maps.Count(); err != nil || v4 != next {
		b.Fatalf("%d sessions in the map after %d grants (%v)", v4, next, err)
	}

	nftNext := 0
	addElement := func(i int) (time.Duration, error) {
		return nftRun(ns, "add", "element", "inet", "aegis", "sessions", "{ "+nftElement(i)+" }")
	}
	var nftP50, nftP99, nftRate, nftBatch []float64
	for range nftRounds {
		lat := make([]time.Duration, nftSingleCalls)
		for i := range lat {
			var err error
			if lat[i], err = addElement(nftNext); err != nil {
				b.Fatal(err)
			}
			nftNext++
		}
		slices.Sort(lat)
		nftP50 = append(nftP50, float64(percentile(lat, 0.50).Microseconds()))
		nftP99 = append(nftP99, float64(percentile(lat, 0.99).Microseconds()))

		// The same at concurrency 16, as the unary grants.
		first := nftNext
		nftNext += nftSingleCalls
		var wg sync.WaitGroup
		errs := make(chan error, unaryC16)
		start := time.Now()
		for w := range unaryC16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < nftSingleCalls; i += unaryC16 {
					if _, err := addElement(first + i); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		nftRate = append(nftRate, float64(nftSingleCalls)/time.Since(start).Seconds())
		close(errs)
		if err := <-errs; err != nil {
			b.Fatal(err)
		}

		var sb strings.Builder
		sb.WriteString("add element inet aegis sessions {\n")
		for i := range streamGrants {
			if i > 0 {
				sb.WriteString(",\n")
			}
			sb.WriteString(nftElement(nftNext))
			nftNext++
		}
		sb.WriteString("\n}\n")
		d := nftFile(b, ns, sb.String())
		nftBatch = append(nftBatch, float64(streamGrants)/d.Seconds())
	}

	med := func(xs []float64) float64 { return median(xs) }
	r := map[string]float64{
		"unary-c1-p50-us": med(p50), "unary-c1-p99-us": med(p99), "unary-c16-grants/s": med(c16), "stream-grants/s": med(stream),
		"nft-single-p50-us": med(nftP50), "nft-single-p99-us": med(nftP99), "nft-single-elems/s": med(nftRate),
		"nft-batch-elems/s": med(nftBatch),
	}
	for k, v := range r {
		b.ReportMetric(v, k)
	}
	ratios := map[string]float64{
		"p50-vs-nft":    r["nft-single-p50-us"] / r["unary-c1-p50-us"],
		"p99-vs-nft":    r["nft-single-p99-us"] / r["unary-c1-p99-us"],
		"c16-vs-nft":    r["unary-c16-grants/s"] / r["nft-single-elems/s"],
		"stream-vs-nft": r["stream-grants/s"] / r["nft-batch-elems/s"],
	}
	for k, v := range ratios {
		b.ReportMetric(v, k+"-x")
	}

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-40s %14s %14s %8s\n", "case", "aegis", "nftables", "ratio")
	fmt.Fprintf(&sb, "%-40s %11.0f us %11.0f us %7.1fx\n", "one grant, p50 (c1 / one nft process)", r["unary-c1-p50-us"], r["nft-single-p50-us"], ratios["p50-vs-nft"])
	fmt.Fprintf(&sb, "%-40s %11.0f us %11.0f us %7.1fx\n", "one grant, p99 (c1 / one nft process)", r["unary-c1-p99-us"], r["nft-single-p99-us"], ratios["p99-vs-nft"])
	fmt.Fprintf(&sb, "%-40s %12.0f/s %12.0f/s %7.1fx\n", "grants at c16 (unary / nft processes)", r["unary-c16-grants/s"], r["nft-single-elems/s"], ratios["c16-vs-nft"])
	fmt.Fprintf(&sb, "%-40s %12.0f/s %12.0f/s %7.1fx\n", "streamed grants / one nft -f batch", r["stream-grants/s"], r["nft-batch-elems/s"], ratios["stream-vs-nft"])
	fmt.Fprintf(&sb, "(medians of %d rounds of %d c1 calls, %d c16 calls, %d streamed; nftables: %d rounds of %d processes one by one, %d 16 at a time, and a %d-element batch)\n",
		cpRounds, unaryC1Calls, unaryC16Calls, streamGrants, nftRounds, nftSingleCalls, nftSingleCalls, streamGrants)
	check := func(ok bool, s string, args ...any) {
		mark := "met"
		if !ok {
			mark = "MISSED"
		}
		fmt.Fprintf(&sb, "target %-55s %s\n", fmt.Sprintf(s, args...), mark)
	}
	check(r["unary-c1-p99-us"] <= 1000, "p99 <= 1 ms at concurrency 1 (%.0f us)", r["unary-c1-p99-us"])
	check(r["unary-c16-grants/s"] >= 15000, ">= 15,000 unary grants/s at c16 (%.0f)", r["unary-c16-grants/s"])
	check(r["stream-grants/s"] >= 200000, ">= 200,000 streamed grants/s (%.0f)", r["stream-grants/s"])
	for _, k := range []string{"p50-vs-nft", "p99-vs-nft", "c16-vs-nft", "stream-vs-nft"} {
		check(ratios[k] >= 10, "%s >= 10x (%.2fx)", k, ratios[k])
	}
	b.Log(sb.String())
}

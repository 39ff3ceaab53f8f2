package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// Sizes of the store benchmarks.
const (
	storeGrantRounds = 3
	storeGrantCalls  = 300 // per round and mode, concurrency 1
	storeC16Calls    = 2_000
	storeSessions    = 1_000_000
	// storeActivityInterval is the control plane's default: the request
	// rate is measured as a fleet would run.
	storeActivityInterval = 10 * time.Second
	storeActivityWindow   = 3 * storeActivityInterval
)

var loopback = netip.MustParseAddr("127.0.0.1")

// loopbackEtcd starts n etcd members on free loopback ports of this
// namespace, with mutual TLS, their data under dataDir ("" for the
// benchmark's temporary directory, on disk).
func loopbackEtcd(b *testing.B, n int, dataDir string) *tu.Etcd {
	b.Helper()
	ms := make([]tu.EtcdMember, n)
	for i := range ms {
		ms[i] = tu.EtcdMember{IP: loopback}
	}
	return tu.StartEtcdOptions(b, ms, tu.EtcdOptions{DataDir: dataDir})
}

func storeFlags(e *tu.Etcd, id string) []string {
	ca, cert, key := e.ClientTLS()
	return []string{"--store", e.StoreFlag(), "--store-ca", ca, "--store-cert", cert, "--store-key", key, "--gateway-id", id}
}

// waitGateways waits until the store lists every gateway of ids as live.
func waitGateways(b *testing.B, e *tu.Etcd, ids ...string) {
	b.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range ids {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, ok, err := e.Get(ctx, 0, "/aegis/gateways/"+id)
			cancel()
			if err == nil && ok {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("gateway %s not live in the store after 30 s: %v", id, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// BenchmarkStoreGrant measures LoginEvent latency through a control plane
// with the etcd store, beside one with --store none, in one run. The
// cluster: three etcd members and three control planes (three gateways'
// worth, each on its own pinned maps), all on this machine's loopback and
// its 2 cores; grants go to the first, and each OK waits for the other
// two to apply the write. Rounds alternate between the modes; the
// latencies of all rounds are pooled. Twice: with the members' data on
// disk, as deployed, and on tmpfs, which takes etcd's fsync out of the
// figure and leaves the control planes' and etcd's own work.
//
//	go test -run '^$' -bench StoreGrant -benchtime 1x -v ./bench/
func BenchmarkStoreGrant(b *testing.B) {
	tu.RequireKernel(b)
	b.Run("disk", func(b *testing.B) { storeGrant(b, "") })
	b.Run("tmpfs", func(b *testing.B) { storeGrant(b, "/dev/shm") })
}

// longIdleClient is a client of s whose grants carry an idle timeout
// longer than the benchmark: the sessions see no traffic, and with a
// store they would be reaped from it, everywhere, after the default
// minute. Both modes use it, so both pay for the interceptor.
func longIdleClient(b *testing.B, s *cpServer) agentv1.AgentServiceClient {
	b.Helper()
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName: pki.ServerName, RootCAs: s.ca.CertPool(), Certificates: []tls.Certificate{s.cert}})),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if r, ok := req.(*agentv1.LoginEventRequest); ok {
				r.IdleTimeout = durationpb.New(time.Hour)
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return agentv1.NewAgentServiceClient(conn)
}

func storeGrant(b *testing.B, dataDir string) {
	e := loopbackEtcd(b, 3, dataDir)
	ids := []string{"gw-0", "gw-1", "gw-2"}
	var gws []*cpServer
	for _, id := range ids {
		gws = append(gws, startCPServerWith(b, 1<<16, nil, storeFlags(e, id)...))
	}
	waitGateways(b, e, ids...)
	none := startCPServerWith(b, 1<<16, nil)
	clustered, plain := longIdleClient(b, gws[0]), longIdleClient(b, none)

	next := 0
	take := func(n int) int { first := next; next += n; return first }
	var latStore, latNone []time.Duration
	var rateStore, rateNone []float64
	before := etcdRequests(b, e)
	for range b.N {
		for range storeGrantRounds {
			latNone = append(latNone, unaryC1(b, plain, take(storeGrantCalls), storeGrantCalls)...)
			latStore = append(latStore, unaryC1(b, clustered, take(storeGrantCalls), storeGrantCalls)...)
		}
		rateNone = append(rateNone, unaryParallel(b, plain, take(storeC16Calls), storeC16Calls, 16))
		rateStore = append(rateStore, unaryParallel(b, clustered, take(storeC16Calls), storeC16Calls, 16))
	}
	after := etcdRequests(b, e)
	// Every grant through gw-0 is in the last gateway's maps.
	want := b.N * (storeGrantRounds*storeGrantCalls + storeC16Calls)
	if v4, _, err := gws[2].maps.Count(); err != nil || v4 != want {
		b.Fatalf("gw-2 holds %d sessions (%v), want %d", v4, err, want)
	}
	slices.Sort(latStore)
	slices.Sort(latNone)
	p50s, p99s := percentile(latStore, 0.50), percentile(latStore, 0.99)
	p50n, p99n := percentile(latNone, 0.50), percentile(latNone, 0.99)
	b.ReportMetric(float64(p50s.Microseconds()), "etcd-p50-µs")
	b.ReportMetric(float64(p99s.Microseconds()), "etcd-p99-µs")
	b.ReportMetric(float64(p50n.Microseconds()), "none-p50-µs")
	b.ReportMetric(float64(p99n.Microseconds()), "none-p99-µs")
	b.ReportMetric(rateStore[len(rateStore)-1], "etcd-c16-grants/s")
	b.ReportMetric(rateNone[len(rateNone)-1], "none-c16-grants/s")
	b.Logf("grant, concurrency 1, %d calls each: --store etcd (3 members, 3 gateways) p50 %v p99 %v; --store none p50 %v p99 %v",
		len(latStore), p50s, p99s, p50n, p99n)
	b.Logf("grants/s at concurrency 16: --store etcd %.0f, --store none %.0f", rateStore[len(rateStore)-1], rateNone[len(rateNone)-1])
	var by []string
	for m, v := range after {
		if d := v - before[m]; d > 0 {
			by = append(by, fmt.Sprintf("%s %.0f", m, d))
		}
	}
	slices.Sort(by)
	b.Logf("etcd requests for %d grants: %s", want, strings.Join(by, ", "))
}

// fillStore writes n sessions into the store through its own client, 128
// to a transaction (etcd's default limit) from 16 writers, and returns
// the time it took.
func fillStore(b *testing.B, e *tu.Etcd, n int) time.Duration {
	b.Helper()
	ca, cert, key := e.ClientTLS()
	tlsc, err := store.TLSConfig(ca, cert, key)
	if err != nil {
		b.Fatal(err)
	}
	// A gateway id of its own: closed below, its liveness key goes with
	// it, so no gateway waits for this writer's acknowledgements.
	st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: e.Endpoints(), TLS: tlsc, Prefix: "/aegis/",
		Gateway: "bench-filler", Log: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	now := time.Now().UnixNano()
	start := time.Now()
	tu.FillStore(b, st, n, func(i int) store.Record {
		src, dst, port := sessionAddrs(i)
		// Longer than the benchmark: nothing expires.
		return store.Record{Key: state.Key{Src: src, Dst: dst, Port: port, Proto: state.TCP}, User: "bench",
			Created: now, LastSeen: now, IdleTimeout: time.Hour}
	})
	return time.Since(start)
}

// storeGateway is a control plane process started by
// startStoreGateway, whose start is timed.
type storeGateway struct {
	id      string
	pin     string
	ready   time.Duration // from exec to the health service's SERVING
	log     string
	maps    *state.Maps
	cmd     *exec.Cmd
	metrics string
}

// startStoreGateway starts aegis-controlplane (built once into dir) on
// fresh maps of capacity 2^20 per family, with the store, and waits until
// its health reports SERVING: with a store that is after the maps hold
// every stored session.
func startStoreGateway(b *testing.B, dir, binary string, e *tu.Etcd, id string, args ...string) *storeGateway {
	b.Helper()
	g := &storeGateway{id: id, pin: tu.PinDir(b), log: filepath.Join(dir, id+".log")}
	tu.PinMaps(b, g.pin, tu.PinOptions{Capacity: 1 << 20})
	logFile, err := os.Create(g.log)
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	port, metrics := freePort(b), freePort(b)
	g.metrics = net.JoinHostPort("127.0.0.1", strconv.Itoa(metrics))
	g.cmd = exec.Command(binary, "--listen-address", "127.0.0.1", "-g", strconv.Itoa(port),
		"--tls-cert", filepath.Join(dir, "s.crt"), "--tls-key", filepath.Join(dir, "s.key"), "--tls-client-ca", filepath.Join(dir, "ca.crt"),
		"--metrics-address", g.metrics, "--pin-path", g.pin, "--log-format", "json")
	g.cmd.Args = append(g.cmd.Args, storeFlags(e, id)...)
	g.cmd.Args = append(g.cmd.Args, args...)
	g.cmd.Stdout, g.cmd.Stderr = logFile, logFile
	start := time.Now()
	if err := g.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- g.cmd.Wait() }()
	b.Cleanup(func() {
		_ = g.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				b.Errorf("%s: %v", id, err)
			}
		case <-time.After(30 * time.Second):
			_ = g.cmd.Process.Kill()
			<-exited
			b.Errorf("%s did not stop within 30 s of SIGTERM; killed", id)
		}
	})
	ca, err := pki.LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		b.Fatal(err)
	}
	cli, _ := ca.IssueClient("controller", time.Hour)
	cert, _ := cli.TLSCertificate()
	s := &cpServer{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), ca: ca, cert: cert}
	health := healthpb.NewHealthClient(s.conn(b))
	// The goal is 100,000 sessions a second, 10 s for a million; the
	// deadline is far beyond, so that a slow join is measured, not failed.
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "aegis.agent.v1.AgentService"})
		cancel()
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(g.log)
			b.Fatalf("%s not serving after 5 min: %v %v\n%s", id, r, err, lastLines(string(out), 20))
		}
	}
	g.ready = time.Since(start)
	if g.maps, err = state.Open(g.pin, state.OpenOptions{Writable: true}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.maps.Close() })
	return g
}

func freePort(b *testing.B) int {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// buildStoreControlPlane builds aegis-controlplane and the TLS files the
// gateways share into a temporary directory.
func buildStoreControlPlane(b *testing.B) (dir, binary string) {
	b.Helper()
	dir = b.TempDir()
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
	if err := ca.WriteFiles(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")); err != nil {
		b.Fatal(err)
	}
	return dir, filepath.Join(dir, "aegis-controlplane")
}

// etcdRequests sums the requests etcd's members received: unary calls
// and messages on streams (watch requests, lease keep-alives), by
// method, from grpc_server_msg_received_total.
func etcdRequests(b *testing.B, e *tu.Etcd) map[string]float64 {
	b.Helper()
	out := map[string]float64{}
	for i := range e.Len() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		text, err := e.Metrics(ctx, i)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		sc := bufio.NewScanner(strings.NewReader(text))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if !strings.HasPrefix(line, "grpc_server_msg_received_total{") {
				continue
			}
			labels, value, _ := strings.Cut(line[len("grpc_server_msg_received_total{"):], "} ")
			v, err := strconv.ParseFloat(value, 64)
			if err != nil {
				b.Fatalf("etcd metric %q: %v", line, err)
			}
			method := "?"
			for _, l := range strings.Split(labels, ",") {
				if m, ok := strings.CutPrefix(l, `grpc_method="`); ok {
					method = strings.TrimSuffix(m, `"`)
				}
			}
			out[method] += v
		}
	}
	return out
}

// activityValues returns the size of each activity value in the store,
// by key.
func activityValues(b *testing.B, e *tu.Etcd) map[string]int {
	b.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), TLS: e.ClientConfig(), DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/aegis/activity/", clientv3.WithPrefix())
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]int{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = len(kv.Key) + len(kv.Value)
	}
	return out
}

// traffic stands in for the data path of one gateway: it raises the
// last_seen of the given share of the sessions (index % of == share) to
// now, every second, as packets through XDP would, with batch updates.
func traffic(ctx context.Context, b *testing.B, m *state.Maps, share, of int) <-chan error {
	done := make(chan error, 1)
	mp := m.ByName()[state.MapSessionsV4]
	var keys []bpf.AegisSessionKeyV4
	var vals []bpf.AegisSessionValue
	err := m.EachV4(func(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) bool {
		// sessionAddrs numbers the sources: split by their number.
		if (int(k.Src[1])<<16|int(k.Src[2])<<8|int(k.Src[3]))%of == share {
			keys = append(keys, *k)
			vals = append(vals, *v)
		}
		return true
	})
	if err != nil {
		b.Fatal(err)
	}
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			now := state.Now()
			for i := range vals {
				vals[i].LastSeenNs = now
			}
			for i := 0; i < len(keys); i += 100_000 {
				j := min(len(keys), i+100_000)
				if _, err := mp.BatchUpdate(keys[i:j], vals[i:j], &ebpf.BatchOptions{}); err != nil {
					done <- fmt.Errorf("raise last_seen: %w", err)
					return
				}
			}
			select {
			case <-ctx.Done():
				done <- nil
				return
			case <-tick.C:
			}
		}
	}()
	return done
}

// BenchmarkStoreJoinAndActivity fills an etcd store (three members on
// loopback) with 1,000,000 sessions, then starts three gateways' control
// planes on empty maps, one after the other, and times each from exec
// to SERVING: the time a gateway joining the fleet (or rebooted) needs to
// hold every session. Then every gateway's data path sees traffic on a
// third of the sessions (all 1,000,000 active across the fleet), and the
// benchmark counts the requests etcd receives over three activity
// intervals (the default 10 s), and the largest activity value.
//
//	go test -run '^$' -bench StoreJoinAndActivity -benchtime 1x -v ./bench/
func BenchmarkStoreJoinAndActivity(b *testing.B) {
	tu.RequireKernel(b)
	// A fifth of the size first: where the million fails, the rate of a
	// smaller store still says how far off it is.
	for _, n := range []int{storeSessions / 5, storeSessions} {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) { storeJoinAndActivity(b, n) })
	}
}

func storeJoinAndActivity(b *testing.B, storeSessions int) {
	e := loopbackEtcd(b, 3, "")
	fill := fillStore(b, e, storeSessions)
	b.Logf("store filled with %d sessions in %v (%.0f/s)", storeSessions, fill.Round(time.Millisecond), float64(storeSessions)/fill.Seconds())
	dir, binary := buildStoreControlPlane(b)

	var gws []*storeGateway
	for i := range 3 {
		g := startStoreGateway(b, dir, binary, e, "gw-"+strconv.Itoa(i), "--activity-interval", storeActivityInterval.String())
		v4, _, err := g.maps.Count()
		if err != nil || v4 != storeSessions {
			b.Fatalf("%s serving with %d sessions in its maps (%v), want %d", g.id, v4, err, storeSessions)
		}
		b.Logf("%s joined a store of %d sessions: serving after %v (%.0f sessions/s)", g.id, storeSessions,
			g.ready.Round(time.Millisecond), float64(storeSessions)/g.ready.Seconds())
		b.Logf("%s: %s, peak resident memory %s", g.id, restoreTimes(b, g), peakMemory(g))
		b.ReportMetric(float64(storeSessions)/g.ready.Seconds(), g.id+"-join-sessions/s")
		gws = append(gws, g)
	}
	waitGateways(b, e, "gw-0", "gw-1", "gw-2")

	ctx, stop := context.WithCancel(context.Background())
	var done []<-chan error
	for i, g := range gws {
		done = append(done, traffic(ctx, b, g.maps, i, len(gws)))
	}
	// One interval for every gateway to publish its first round.
	time.Sleep(storeActivityInterval + 2*time.Second)
	before := etcdRequests(b, e)
	start := time.Now()
	time.Sleep(storeActivityWindow)
	after := etcdRequests(b, e)
	elapsed := time.Since(start)
	stop()
	for _, d := range done {
		if err := <-d; err != nil {
			b.Fatal(err)
		}
	}
	var total float64
	var by []string
	for m, v := range after {
		d := v - before[m]
		total += d
		if d > 0 {
			by = append(by, fmt.Sprintf("%s %.0f", m, d))
		}
	}
	slices.Sort(by)
	sizes := activityValues(b, e)
	largest, sum := 0, 0
	for _, s := range sizes {
		largest = max(largest, s)
		sum += s
	}
	if len(sizes) == 0 {
		b.Fatal("no activity in the store")
	}
	rate := total / elapsed.Seconds()
	b.ReportMetric(rate, "etcd-requests/s")
	b.ReportMetric(float64(largest), "largest-activity-bytes")
	b.Logf("activity of %d active sessions on 3 gateways, --activity-interval %v: %.0f etcd requests in %v = %.1f/s (%s)",
		storeSessions, storeActivityInterval, total, elapsed.Round(time.Millisecond), rate, strings.Join(by, ", "))
	b.Logf("activity in the store: %d values, %d bytes in all, the largest %d bytes", len(sizes), sum, largest)
}

// restoreTimes says how long the gateway's first restore took to read the
// snapshot and in all, from its log; the rest of its join is starting
// and connecting.
func restoreTimes(b *testing.B, g *storeGateway) string {
	b.Helper()
	out, err := os.ReadFile(g.log)
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		var l struct {
			Msg        string  `json:"message"`
			Read, Took float64 // milliseconds
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "maps restored from the store" {
			return fmt.Sprintf("snapshot read in %.2f s, maps written in %.2f s", l.Read/1000, (l.Took-l.Read)/1000)
		}
	}
	return "no restore logged"
}

// peakMemory is the gateway process's peak resident set (VmHWM).
func peakMemory(g *storeGateway) string {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", g.cmd.Process.Pid))
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

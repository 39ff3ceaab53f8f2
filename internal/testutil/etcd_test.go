package testutil_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// storeNet puts n namespaces on one bridge (in a namespace of its own),
// at 203.0.113.1, .2, ...
func storeNet(t *testing.T, n int) []tu.EtcdMember {
	t.Helper()
	sw := tu.NewNetns(t, "aegis-sw-")
	sw.Run(t, "ip", "link", "add", "br0", "type", "bridge")
	sw.Run(t, "ip", "link", "set", "br0", "up")
	var out []tu.EtcdMember
	for i := range n {
		ns := tu.NewNetns(t, "aegis-etcd-")
		port := fmt.Sprintf("p%d", i)
		sw.Run(t, "ip", "link", "add", port, "type", "veth", "peer", "name", "e0", "netns", ns.Name)
		sw.Run(t, "ip", "link", "set", port, "master", "br0", "up")
		ip := netip.AddrFrom4([4]byte{203, 0, 113, byte(i + 1)})
		ns.Run(t, "ip", "addr", "add", ip.String()+"/24", "dev", "e0")
		ns.Run(t, "ip", "link", "set", "e0", "up")
		out = append(out, tu.EtcdMember{Netns: ns, IP: ip})
	}
	return out
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Three members in three namespaces with mutual TLS: one killed, the
// quorum stays and writes go on; two killed, a write fails and health says
// so; both restarted on their data, the cluster is healthy again with
// everything written before.
func TestEtcdHarnessQuorum(t *testing.T) {
	e := tu.StartEtcd(t, storeNet(t, 3))
	if got := e.Endpoints(); len(got) != 3 || got[0] != "https://203.0.113.1:2379" {
		t.Fatalf("endpoints %v", got)
	}
	if err := e.Put(ctxFor(t, 5*time.Second), 0, "/k/all", "3"); err != nil {
		t.Fatalf("put with 3 members: %v", err)
	}

	e.Kill(0)
	if e.Running(0) {
		t.Fatal("member 0 still runs after Kill")
	}
	// A quorum of 2 of 3 remains: once it has a leader (member 0 may have
	// been it), writes succeed through either survivor.
	e.WaitHealthy(t)
	if err := e.Put(ctxFor(t, 10*time.Second), 1, "/k/two", "2"); err != nil {
		t.Fatalf("put with 2 of 3 members: %v", err)
	}
	if v, ok, err := e.Get(ctxFor(t, 5*time.Second), 2, "/k/two"); err != nil || !ok || v != "2" {
		t.Fatalf("get through the other survivor: %q %v %v", v, ok, err)
	}

	e.Kill(1)
	err := e.Put(ctxFor(t, 3*time.Second), 2, "/k/one", "1")
	if err == nil {
		t.Fatal("a put with 1 of 3 members succeeded")
	}
	t.Logf("put without quorum: %v", err)
	if err := e.Healthy(ctxFor(t, 3*time.Second), 2); err == nil {
		t.Fatal("the last member reports healthy without quorum")
	}

	e.Restart(0)
	e.Restart(1)
	e.WaitHealthy(t)
	for i := range 3 {
		for k, want := range map[string]string{"/k/all": "3", "/k/two": "2"} {
			v, ok, err := e.Get(ctxFor(t, 5*time.Second), i, k)
			if err != nil || !ok || v != want {
				t.Fatalf("member %d after the restarts: %s = %q %v %v, want %q", i, k, v, ok, err, want)
			}
		}
	}
}

// The one-member convenience runs in the test's own namespace on free
// loopback ports, never on the system instance's 2379, and refuses a
// client without a certificate.
func TestEtcdHarnessLocal(t *testing.T) {
	tu.RequireKernel(t) // root, for parity with the cluster test; etcd itself needs none
	e := tu.StartEtcdLocal(t)
	ep := e.Endpoints()
	if len(ep) != 1 || !strings.HasPrefix(ep[0], "https://127.0.0.1:") || strings.HasSuffix(ep[0], ":2379") {
		t.Fatalf("endpoints %v", ep)
	}
	if err := e.Put(ctxFor(t, 5*time.Second), 0, "/k", "v"); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := e.Get(ctxFor(t, 5*time.Second), 0, "/k"); err != nil || !ok || v != "v" {
		t.Fatalf("get: %q %v %v", v, ok, err)
	}
	ca, cert, key := e.ClientTLS()
	for _, f := range []string{ca, cert, key} {
		if f == "" {
			t.Fatal("empty TLS file path")
		}
	}
	if e.StoreFlag() != "etcd:"+ep[0] {
		t.Fatalf("store flag %q", e.StoreFlag())
	}
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.CA().CertPool()}}}
	if resp, err := anon.Get(ep[0] + "/health"); err == nil {
		resp.Body.Close()
		t.Fatalf("a client without a certificate got %s", resp.Status)
	}
}

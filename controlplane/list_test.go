package controlplane_test

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

type listed struct {
	src, dst string
	port     uint32
	proto    agentv1.Protocol
}

func keyOf(s *agentv1.Session) listed {
	return listed{s.GetSrcIp(), s.GetDstIp(), s.GetDstPort(), s.GetProtocol()}
}

// walkPages lists every page of req, k at a time, and returns the sessions
// in the order listed.
func walkPages(t *testing.T, agent agentv1.AgentServiceClient, req *agentv1.ListSessionsRequest, k uint32) []*agentv1.Session {
	t.Helper()
	var all []*agentv1.Session
	req.PageSize = k
	for pages := 0; ; pages++ {
		resp, err := agent.ListSessions(ctx(t), req)
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if uint32(len(resp.GetSessions())) > k {
			t.Fatalf("page %d holds %d sessions, more than %d", pages, len(resp.GetSessions()), k)
		}
		all = append(all, resp.GetSessions()...)
		if resp.GetNextPageToken() == "" {
			return all
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// sessionV6 is the i-th IPv6 session of the tests.
func sessionV6(i int, user string) state.Session {
	now := state.Now()
	return state.Session{Key: state.Key{Src: netip.MustParseAddr(fmt.Sprintf("2001:db8:1::%x", i+1)), Dst: svcA6, Port: 443, Proto: state.UDP},
		User: user, LastSeen: now, Created: now}
}

func TestListSessionsPages(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 10000})
	const n4, n6 = 2345, 300
	tu.FillSessionsV4(t, e.pin, n4, "bulk", state.Now())
	m := e.maps()
	for i := range n6 {
		user := "six"
		if i%3 == 0 {
			user = "third"
		}
		if err := m.Grant(sessionV6(i, user)); err != nil {
			t.Fatal(err)
		}
	}
	agent, _ := e.controller()
	for _, k := range []uint32{13, 100, 5000} {
		all := walkPages(t, agent, &agentv1.ListSessionsRequest{}, k)
		seen := map[listed]bool{}
		for i, s := range all {
			if seen[keyOf(s)] {
				t.Fatalf("pages of %d: %v listed twice", k, keyOf(s))
			}
			seen[keyOf(s)] = true
			// Key order: IPv4 first.
			if i > 0 && netip.MustParseAddr(s.GetSrcIp()).Is4() && !netip.MustParseAddr(all[i-1].GetSrcIp()).Is4() {
				t.Fatalf("pages of %d: IPv4 after IPv6", k)
			}
		}
		if len(seen) != n4+n6 {
			t.Fatalf("pages of %d: %d sessions listed, want %d", k, len(seen), n4+n6)
		}
	}
	// Filters apply before paging: pages hold only matches, and matched
	// counts them all.
	third := walkPages(t, agent, &agentv1.ListSessionsRequest{User: "third"}, 30)
	if len(third) != n6/3 {
		t.Fatalf("user filter over pages: %d sessions, want %d", len(third), n6/3)
	}
	for _, s := range third {
		if s.GetUser() != "third" {
			t.Fatalf("user filter listed %v", s)
		}
	}
	resp, err := agent.ListSessions(ctx(t), &agentv1.ListSessionsRequest{User: "third", PageSize: 30})
	if err != nil || len(resp.GetSessions()) != 30 || resp.GetMatched() != n6/3 {
		t.Fatalf("first page of a filter: %d sessions, matched %d, %v", len(resp.GetSessions()), resp.GetMatched(), err)
	}
	// Default and largest page sizes.
	resp, err = agent.ListSessions(ctx(t), &agentv1.ListSessionsRequest{})
	if err != nil || len(resp.GetSessions()) != controlplane.DefaultPageSize || resp.GetMatched() != n4+n6 || resp.GetNextPageToken() == "" {
		t.Fatalf("default page: %d sessions, matched %d, next %q, %v", len(resp.GetSessions()), resp.GetMatched(), resp.GetNextPageToken(), err)
	}
	resp, err = agent.ListSessions(ctx(t), &agentv1.ListSessionsRequest{PageSize: 1 << 20})
	if err != nil || len(resp.GetSessions()) != n4+n6 || resp.GetNextPageToken() != "" {
		t.Fatalf("a page larger than the map: %d sessions, next %q, %v", len(resp.GetSessions()), resp.GetNextPageToken(), err)
	}
}

func TestListSessionsLargestPage(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 2 * controlplane.MaxPageSize})
	tu.FillSessionsV4(t, e.pin, controlplane.MaxPageSize+5, "bulk", state.Now())
	agent, _ := e.controller()
	resp, err := agent.ListSessions(ctx(t), &agentv1.ListSessionsRequest{PageSize: 1 << 20})
	if err != nil || len(resp.GetSessions()) != controlplane.MaxPageSize || resp.GetNextPageToken() == "" {
		t.Fatalf("page of %d asked: %d sessions, next %q, %v", 1<<20, len(resp.GetSessions()), resp.GetNextPageToken(), err)
	}
}

// While sessions come and go, a walk of the pages lists every session that
// exists throughout exactly once, and no session twice.
func TestListSessionsPagesOfAChangingMap(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 20000})
	const stable = 3000
	tu.FillSessionsV4(t, e.pin, stable, "stable", state.Now())
	agent, _ := e.controller()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m := e.maps()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// Keys interleaved with the stable ones, in both families.
			k := tu.FillKeyV4(stable + i%5000)
			s4 := state.Session{Key: state.Key{Src: netip.AddrFrom4(k.Src), Dst: netip.AddrFrom4(k.Dst), Port: k.Dport, Proto: state.UDP},
				User: "churn", LastSeen: state.Now(), Created: state.Now()}
			s6 := sessionV6(i%700, "churn")
			if i%2 == 0 {
				_ = m.Grant(s4)
				_ = m.Grant(s6)
			} else {
				_ = m.Revoke(s4.Key)
				_ = m.Revoke(s6.Key)
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	for round := range 3 {
		all := walkPages(t, agent, &agentv1.ListSessionsRequest{}, 97)
		seen := map[listed]int{}
		for _, s := range all {
			seen[keyOf(s)]++
			if seen[keyOf(s)] > 1 {
				t.Fatalf("round %d: %v listed twice", round, keyOf(s))
			}
		}
		for i := range stable {
			k := tu.FillKeyV4(i)
			l := listed{netip.AddrFrom4(k.Src).String(), netip.AddrFrom4(k.Dst).String(), uint32(k.Dport), agentv1.Protocol_PROTOCOL_TCP}
			if seen[l] != 1 {
				t.Fatalf("round %d: stable session %v listed %d times", round, l, seen[l])
			}
		}
	}
}

func TestListSessionsBadPageToken(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	before := e.dump()
	for _, tok := range []string{"not base64!", "AQ", "AgQBAgMEBQYHCAkKCw", "AQUBAgMEBQYHCAkKCw", "AQQBAgMEBQYHCAkK"} {
		_, err := agent.ListSessions(ctx(t), &agentv1.ListSessionsRequest{PageToken: tok})
		if code(err) != codes.InvalidArgument {
			t.Errorf("page_token %q: %v, want InvalidArgument", tok, err)
		}
	}
	e.sameSessions("after bad tokens", before)
}

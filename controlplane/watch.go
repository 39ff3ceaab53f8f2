package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/verdicts"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// verdictHub is the process's one reader of the events ring buffer,
// started by the first WatchVerdicts and stopped with the server.
type verdictHub struct {
	mu  sync.Mutex
	hub *verdicts.Hub
	// switches counts the moves to a new events map (followEvents).
	switches atomic.Uint64
}

// verdicts returns the hub, starting it on the events map of the pinned
// maps open now. It holds its own reader of the map, so a refresh of the
// handle does not close it; followEvents moves it when the pinned map is
// replaced.
func (s *Server) verdicts() (*verdicts.Hub, error) {
	s.vh.mu.Lock()
	defer s.vh.mu.Unlock()
	if s.vh.hub != nil {
		return s.vh.hub, nil
	}
	var hub *verdicts.Hub
	err := s.maps.Do(func(m *state.Maps) error {
		events, err := m.Events.Clone()
		if err != nil {
			return fmt.Errorf("clone events map: %w", err)
		}
		hub, err = verdicts.NewHub(events, verdicts.Options{Log: s.log})
		events.Close() // the reader keeps its own mapping and epoll registration
		return err
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-s.stopping
		cancel()
	}()
	go func() {
		if err := hub.Run(ctx); err != nil {
			s.log.Error().Err(err).Msg("verdict events reader stopped")
		}
		s.vh.mu.Lock()
		if s.vh.hub == hub {
			s.vh.hub = nil
		}
		s.vh.mu.Unlock()
	}()
	s.vh.hub = hub
	return hub, nil
}

// followEvents moves the hub to the pinned events map when that is no
// longer the one it reads: a full unload removed the pins and a load made
// new maps. The old map stays alive as long as a reader holds it, but no
// program writes to it, so without the move every watcher would hear
// nothing until this process restarts. The watchers' streams go on; what
// they miss is only what no program emitted. Runs after each refresh of
// the handle, so within a refresh interval of the load.
func (s *Server) followEvents() {
	s.vh.mu.Lock()
	hub := s.vh.hub
	s.vh.mu.Unlock()
	pinned := s.maps.MapID(state.MapEvents)
	if hub == nil || pinned == 0 || pinned == hub.Source() {
		return
	}
	from := hub.Source()
	err := s.maps.Do(func(m *state.Maps) error {
		events, err := m.Events.Clone()
		if err != nil {
			return fmt.Errorf("clone events map: %w", err)
		}
		defer events.Close() // the reader keeps its own mapping
		return hub.Switch(events)
	})
	if err != nil {
		s.log.Warn().Err(err).Msg("verdict events reader: cannot move to the new events map")
		return
	}
	s.vh.switches.Add(1)
	s.log.Info().Uint32("from_map_id", uint32(from)).Uint32("to_map_id", uint32(pinned)).
		Msg("events map replaced by a new load: the verdict watchers now follow the new one")
}

// watchFilter decodes a WatchVerdicts request's filter.
func watchFilter(req *agentv1.WatchVerdictsRequest) (verdicts.Filter, error) {
	f := verdicts.Filter{Verdict: req.GetVerdict()}
	for _, name := range req.GetReasons() {
		r, ok := bpf.ParseReason(name)
		if !ok {
			return f, fmt.Errorf("unknown reason %q", name)
		}
		f.Reasons = append(f.Reasons, r)
	}
	for _, c := range []struct {
		in  string
		out *netip.Prefix
	}{{req.GetSourceCidr(), &f.Src}, {req.GetDestinationCidr(), &f.Dst}} {
		if c.in == "" {
			continue
		}
		p, err := parsePrefix(c.in)
		if err != nil {
			return f, err
		}
		*c.out = p
	}
	if req.GetPort() > 65535 {
		return f, fmt.Errorf("port %d out of range", req.GetPort())
	}
	if req.GetProtocol() > 255 {
		return f, fmt.Errorf("protocol %d out of range", req.GetProtocol())
	}
	f.Port, f.Proto = uint16(req.GetPort()), uint8(req.GetProtocol())
	return f, f.Validate()
}

// parsePrefix accepts a prefix or a single address.
func parsePrefix(s string) (netip.Prefix, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, fmt.Errorf("parse prefix %q: %w", s, err)
	}
	return p.Masked(), nil
}

// ifnames resolves interface indexes, remembering the answers for one
// stream.
type ifnames map[uint32]string

func (n ifnames) name(i uint32) string {
	if s, ok := n[i]; ok {
		return s
	}
	s := ""
	if ifi, err := net.InterfaceByIndex(int(i)); err == nil {
		s = ifi.Name
	}
	n[i] = s
	return s
}

func verdictEvent(e *verdicts.Event, names ifnames) *agentv1.VerdictEvent {
	out := &agentv1.VerdictEvent{
		Time: timestamppb.New(e.Time), Ifindex: e.Ifindex, Interface: names.name(e.Ifindex),
		SourcePort: uint32(e.Sport), DestinationPort: uint32(e.Dport), Protocol: uint32(e.Proto),
		Action: e.Action.Verdict(), Reason: e.Reason.String(), Cause: e.Cause.String(), Verdict: e.Enforced(),
		Length: e.Len,
	}
	if e.Src.IsValid() {
		out.Source, out.Destination = e.Src.String(), e.Dst.String()
	}
	return out
}

// WatchVerdicts streams sampled verdict events (see verdicts.Hub).
func (a *agentService) WatchVerdicts(req *agentv1.WatchVerdictsRequest, stream grpc.ServerStreamingServer[agentv1.WatchVerdictsResponse]) error {
	f, err := watchFilter(req)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "watch verdicts: %v", err)
	}
	hub, err := a.s.verdicts()
	if err != nil {
		return status.Errorf(codes.Unavailable, "watch verdicts: %v", err)
	}
	history := req.GetSince() != nil || req.GetLast() > 0
	var since time.Time
	if req.GetSince() != nil {
		since = req.GetSince().AsTime()
	}
	w, backlog, err := hub.Watch(f, since, int(req.GetLast()))
	if errors.Is(err, verdicts.ErrTooManyWatchers) {
		return status.Errorf(codes.ResourceExhausted, "watch verdicts: %v", err)
	}
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "watch verdicts: %v", err)
	}
	defer w.Close()
	names := ifnames{}
	if history {
		for i := range backlog {
			if err := stream.Send(&agentv1.WatchVerdictsResponse{Event: verdictEvent(&backlog[i], names)}); err != nil {
				return err
			}
		}
	}
	if req.GetNoFollow() {
		return nil
	}
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.s.stopping:
			return status.Error(codes.Unavailable, "watch verdicts: server shutting down")
		case e, ok := <-w.C():
			if !ok {
				return status.Error(codes.Unavailable, "watch verdicts: events reader stopped")
			}
			if err := stream.Send(&agentv1.WatchVerdictsResponse{Event: verdictEvent(&e, names), Lost: w.Lost()}); err != nil {
				return err
			}
		}
	}
}

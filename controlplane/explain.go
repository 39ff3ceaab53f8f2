package controlplane

import (
	"context"
	"errors"
	"net/netip"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/internal/explain"
	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// Explain runs the data path's model on the live entries one packet would
// look up (internal/explain); it reads the maps and writes nothing.
func (a *agentService) Explain(_ context.Context, req *agentv1.ExplainRequest) (*agentv1.ExplainResponse, error) {
	src, err1 := netip.ParseAddr(req.GetSource())
	dst, err2 := netip.ParseAddr(req.GetDestination())
	if err := errors.Join(err1, err2); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "explain: %v", err)
	}
	if req.GetDestinationPort() > 65535 || req.GetSourcePort() > 65535 || req.GetProtocol() > 255 {
		return nil, status.Error(codes.InvalidArgument, "explain: port or protocol out of range")
	}
	f := explain.Flow{Src: src, Dst: dst, Port: uint16(req.GetDestinationPort()), Sport: uint16(req.GetSourcePort()), Proto: uint8(req.GetProtocol())}
	var res *explain.Result
	loc := explain.ForPins(a.s.maps.PinPath())
	defer loc.Close()
	err := a.s.maps.Do(func(m *state.Maps) error {
		var err error
		if res, err = explain.Explain(m, f, loc.Local); err == nil {
			err = loc.Err()
		}
		return err
	})
	switch {
	case errors.Is(err, explain.ErrInvalidFlow):
		return nil, status.Errorf(codes.InvalidArgument, "explain: %v", err)
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "explain: %v", err)
	}
	why := res.Why()
	if n := loc.Note(); n != "" {
		why += "; " + n
	}
	return &agentv1.ExplainResponse{Action: res.Action.Verdict(), Reason: res.Reason.String(), Cause: res.Cause.String(),
		Verdict: res.Cause.Verdict(), Why: why, Flow: res.FlowString()}, nil
}

package controlplane

import (
	"context"

	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/stats"
)

// serverCodec is the server's codec: protobuf, except that a pre-encoded
// snapshot (outgoing) goes out as its bytes, so that every MonitorSessions
// stream sends the one buffer without marshalling or copying it.
// grpc.PreparedMsg would encode once per stream; this encodes once in all.
type serverCodec struct{ proto encoding.CodecV2 }

func newServerCodec() serverCodec { return serverCodec{proto: encoding.GetCodecV2(protocodec.Name)} }

// outgoing is a snapshot being sent on one stream.
type outgoing struct {
	snap  *compatSnapshot
	holds *sendHolds
}

func (c serverCodec) Marshal(v any) (mem.BufferSlice, error) {
	o, ok := v.(*outgoing)
	if !ok {
		return c.proto.Marshal(v)
	}
	data := o.snap.data
	if mem.IsBelowBufferPoolingThreshold(cap(data)) {
		// gRPC wraps so small a buffer without reference counting: nothing
		// to track, and little to hold.
		return mem.BufferSlice{mem.SliceBuffer(data)}, nil
	}
	// The transport never writes into the buffer; it frees it, calling
	// holds.Put, when written or when the stream is gone.
	o.holds.hold()
	return mem.BufferSlice{mem.NewBuffer(&data, o.holds)}, nil
}

func (c serverCodec) Unmarshal(data mem.BufferSlice, v any) error { return c.proto.Unmarshal(data, v) }

func (c serverCodec) Name() string { return c.proto.Name() }

// connTracker is a stats.Handler that tells a stream's handler when its
// connection closes.
type connTracker struct{}

type connKey struct{}

type connState struct{ done chan struct{} }

func connOf(ctx context.Context) *connState {
	c, _ := ctx.Value(connKey{}).(*connState)
	return c
}

func (connTracker) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return context.WithValue(ctx, connKey{}, &connState{done: make(chan struct{})})
}

func (connTracker) HandleConn(ctx context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnEnd); ok {
		if c := connOf(ctx); c != nil {
			close(c.done)
		}
	}
}

func (connTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (connTracker) HandleRPC(context.Context, stats.RPCStats) {}

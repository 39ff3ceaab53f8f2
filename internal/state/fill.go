package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// Fill describes how full one sessions map is.
type Fill struct {
	// Entries is the number of sessions in the map, expired ones that the
	// reaper has not deleted yet included.
	Entries int
	// Active is the number of sessions the data path passes at the time
	// asked for.
	Active int
	// Capacity is the map's size (aegis-loader --max-sessions).
	Capacity int
}

// Fill counts the sessions of both maps, and those of them the data path
// passes at now given the config's default idle timeout. It batch-reads
// the maps without decoding the sessions, for metrics scrapes.
func (m *Maps) Fill(defaultIdle time.Duration, now uint64) (v4, v6 Fill, err error) {
	if v4, err = fill(m.SessionsV4, defaultIdle, now); err != nil {
		return v4, v6, err
	}
	v6, err = fill(m.SessionsV6, defaultIdle, now)
	return v4, v6, err
}

func fill(mp *ebpf.Map, defaultIdle time.Duration, now uint64) (Fill, error) {
	vals := make([]bpf.AegisSessionValue, batchSize)
	if mp.KeySize() == uint32(binary.Size(bpf.AegisSessionKeyV4{})) {
		return fillBatch(mp, make([]bpf.AegisSessionKeyV4, batchSize), vals, defaultIdle, now)
	}
	return fillBatch(mp, make([]bpf.AegisSessionKeyV6, batchSize), vals, defaultIdle, now)
}

func fillBatch[K any](mp *ebpf.Map, keys []K, vals []bpf.AegisSessionValue, defaultIdle time.Duration, now uint64) (Fill, error) {
	f := Fill{Capacity: int(mp.MaxEntries())}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := mp.BatchLookup(&cursor, keys, vals, nil)
		f.Entries += n
		for i := range n {
			if r, _ := bpf.SessionVerdict(&vals[i], uint64(defaultIdle), now); r == bpf.ReasonSession {
				f.Active++
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return f, nil
		}
		if err != nil {
			return f, fmt.Errorf("count %s: %w", mp, err)
		}
	}
}

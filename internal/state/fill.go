package state

import (
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
	f := Fill{Capacity: int(mp.MaxEntries())}
	err := eachValues(mp, func(vals []bpf.AegisSessionValue) {
		f.Entries += len(vals)
		for i := range vals {
			if r, _ := bpf.SessionVerdict(&vals[i], uint64(defaultIdle), now); r == bpf.ReasonSession {
				f.Active++
			}
		}
	})
	return f, err
}

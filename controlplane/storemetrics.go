package controlplane

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics of the session store, with --store only:
//
//	aegis_store_up                          gauge: 1 when the store answered the last probe (once a second)
//	aegis_store_restored                    gauge: 1 once the maps were restored from the store
//	aegis_store_applied_revision            gauge: revision up to which the maps hold every change
//	aegis_store_sessions                    gauge: sessions in the store, as this gateway last applied them
//	aegis_store_peers                       gauge: other live gateways (etcd)
//	aegis_store_peer_lag_revisions          gauge: how far the slowest other live gateway's applied revision is behind this one's
//	aegis_store_ack_timeouts_total          writes acknowledged after --store-ack-timeout without every live gateway's apply
//	aegis_store_resyncs_total{reason}       restores from a snapshot after the watch ended (compacted, requested, error)
//	aegis_store_apply_errors_total          store changes this gateway could not write into its maps (a full map)
//	aegis_store_activity_publications_total{result}
//	aegis_store_activity_touched_total      sessions whose last_seen another gateway's activity raised
//	aegis_store_reaped_total                sessions this gateway removed from the store as expired everywhere
type storeMetrics struct {
	l           *storeLoop
	ackTimeouts prometheus.Counter
	resyncs     *prometheus.CounterVec
	applyErrors prometheus.Counter
	activity    *prometheus.CounterVec
	touched     prometheus.Counter
	reaped      prometheus.Counter
}

func newStoreMetrics(l *storeLoop) *storeMetrics {
	m := &storeMetrics{
		l: l,
		ackTimeouts: prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_store_ack_timeouts_total",
			Help: "Grants and revokes acknowledged after --store-ack-timeout although some live gateway had not applied them yet."}),
		resyncs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "aegis_store_resyncs_total",
			Help: "Restores of the maps from a store snapshot after the watch ended, by reason (compacted, requested, error)."}, []string{"reason"}),
		applyErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_store_apply_errors_total",
			Help: "Store changes this gateway could not write into its maps (a full sessions map)."}),
		activity: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "aegis_store_activity_publications_total",
			Help: "Publications of this gateway's session activity, by result (published, error)."}, []string{"result"}),
		touched: prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_store_activity_touched_total",
			Help: "Sessions whose last_seen another gateway's activity raised in this gateway's maps."}),
		reaped: prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_store_reaped_total",
			Help: "Sessions this gateway removed from the store because they had expired on every gateway."}),
	}
	for _, r := range []string{"compacted", "requested", "error"} {
		m.resyncs.WithLabelValues(r)
	}
	for _, r := range []string{"published", "error"} {
		m.activity.WithLabelValues(r)
	}
	return m
}

func (m *storeMetrics) collectors() []prometheus.Collector {
	l := m.l
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	return []prometheus.Collector{
		m.ackTimeouts, m.resyncs, m.applyErrors, m.activity, m.touched, m.reaped,
		gauge("aegis_store_up", "1 when the session store answered the last probe (once a second), 0 when it is unreachable.",
			func() float64 { return b(l.up.Load()) }),
		gauge("aegis_store_restored", "1 once the maps were restored from the session store.",
			func() float64 { return b(l.restored.Load()) }),
		gauge("aegis_store_applied_revision", "Store revision up to which this gateway's maps hold every change.",
			func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(l.applied) }),
		gauge("aegis_store_sessions", "Sessions in the store as this gateway last applied them.",
			func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(len(l.index)) }),
		gauge("aegis_store_peers", "Other live gateways sharing the store.", func() float64 { return float64(len(l.peers())) }),
		gauge("aegis_store_peer_lag_revisions", "How many revisions the slowest other live gateway's applied revision is behind this gateway's.",
			func() float64 {
				l.mu.Lock()
				applied := l.applied
				l.mu.Unlock()
				lag := int64(0)
				for _, r := range l.peers() {
					lag = max(lag, applied-r)
				}
				return float64(lag)
			}),
	}
}

func (l *storeLoop) peers() map[string]int64 {
	if p, ok := l.st.(interface{ Peers() map[string]int64 }); ok {
		return p.Peers()
	}
	return nil
}

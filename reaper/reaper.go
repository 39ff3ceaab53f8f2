// Package reaper is aegis-reaper: the daemon that deletes expired sessions
// from the pinned sessions maps on an interval.
//
// The data path refuses an expired session on its own, at once; the reaper
// reclaims the map space and reports what expired. It needs only the
// pinned maps (CAP_BPF and the pins' group), never the control plane:
// either can run while the other is down. The map mechanics, and why a
// sweep never deletes a session that is still live, are in
// internal/state/sweep.go. With --metrics-address it is also the data
// path's exporter (exporter.go).
//
// With a session store (aegis-controlplane --store), the reaper still
// only reclaims its own gateway's maps, and needs no store flags: removing
// a session that expired on every gateway from the store is the control
// plane's (controlplane/storeactivity.go), since only it knows the
// activity the other gateways published. A restore from the store never
// writes back a session the store's times say has expired.
package reaper

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
)

// Reaper sweeps the maps pinned under one directory.
type Reaper struct {
	pinPath  string
	interval time.Duration
	log      zerolog.Logger
	sweeper  *state.Sweeper
	metrics  *metrics

	mu      sync.Mutex
	lastRun time.Time // end of the last sweep or wait for the loader
	lastErr error     // of the last sweep; nil after a success
	waiting bool      // the maps are not pinned
}

// New returns a reaper of the maps under pinPath that sweeps every
// interval in daemon mode.
func New(pinPath string, interval time.Duration, log zerolog.Logger) *Reaper {
	return &Reaper{pinPath: pinPath, interval: interval, log: log,
		sweeper: state.NewSweeper(), metrics: newMetrics(pinPath, log)}
}

// Once opens the maps, sweeps them once and closes them. Returns the open
// error (state.ErrNotLoaded when the loader has not run) or the sweep's.
func (r *Reaper) Once(ctx context.Context) error {
	m, err := state.Open(r.pinPath, state.OpenOptions{Writable: true})
	if err != nil {
		return err
	}
	defer m.Close()
	return r.sweep(ctx, m)
}

// Run sweeps every interval until ctx ends, following the loader's unload
// and reload of the maps. With metricsAddr set it serves metrics there.
//
// Readiness: it tells systemd it is ready after its first attempt to
// sweep, whether that found maps or not. Without maps it says so in its
// status and waits for the loader; blocking readiness on the loader would
// only turn a data path that is not loaded yet into a start timeout of a
// process that has nothing else to wait for. Errors that a restart cannot
// fix (no permission on the pins, an incompatible map layout, a metrics
// address in use) are returned before readiness; a failed sweep is logged
// and retried on the next interval.
//
// Health, for the systemd watchdog: the last sweep succeeded (or found no
// maps to sweep) and the loop has run within two intervals and a minute.
func (r *Reaper) Run(ctx context.Context, metricsAddr string) error {
	h := state.NewHandle(r.pinPath, state.OpenOptions{Writable: true}, r.log)
	defer h.Close()

	if metricsAddr != "" {
		// The data path's series come from this process (exporter.go).
		for _, c := range []prometheus.Collector{newExporter(h, r.log), intervalGauge(r.interval)} {
			if err := r.metrics.reg.Register(c); err != nil {
				return fmt.Errorf("register metrics: %w", err)
			}
		}
		srv, err := daemon.ListenMetrics(metricsAddr, r.metrics.reg)
		if err != nil {
			return err
		}
		go srv.Serve(r.log)
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
		r.log.Info().Stringer("address", srv.Addr()).Msg("serving metrics")
	}

	err := r.tick(ctx, h)
	switch {
	case ctx.Err() != nil:
		daemon.Stopping(r.log)
		r.log.Info().Msg("reaper stopped")
		return nil
	case errors.Is(err, state.ErrPermission), errors.Is(err, state.ErrIncompatible):
		return err
	case err != nil:
		r.log.Error().Err(err).Msg("sweep failed")
	}
	daemon.Ready(r.log)
	r.log.Info().Str("pin_path", r.pinPath).Stringer("interval", r.interval).Msg("reaper started")
	go daemon.Watchdog(ctx, r.log, r.healthy)

	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			daemon.Stopping(r.log)
			r.log.Info().Msg("reaper stopped")
			return nil
		case <-t.C:
		}
		if err := r.tick(ctx, h); err != nil && !errors.Is(err, context.Canceled) {
			r.log.Error().Err(err).Msg("sweep failed")
		}
	}
}

// tick follows the pins and sweeps if there are maps. It returns the
// error of opening or sweeping the maps; a missing data path is no error.
func (r *Reaper) tick(ctx context.Context, h *state.Handle) error {
	err := h.Refresh()
	if errors.Is(err, state.ErrNotLoaded) {
		r.mu.Lock()
		first := !r.waiting
		r.waiting, r.lastErr, r.lastRun = true, nil, time.Now()
		r.mu.Unlock()
		if first {
			r.log.Warn().Err(err).Msg("no sessions maps to sweep; waiting for aegis-loader")
			daemon.Status("waiting for aegis-loader: no maps pinned at " + r.pinPath)
		}
		return nil
	}
	if err == nil {
		err = h.Do(func(m *state.Maps) error { return r.sweep(ctx, m) })
	} else {
		r.metrics.errors.Inc()
	}
	r.mu.Lock()
	wasWaiting := r.waiting
	r.waiting, r.lastRun = false, time.Now()
	r.lastErr = err
	if errors.Is(err, context.Canceled) {
		r.lastErr = nil
	}
	r.mu.Unlock()
	switch {
	case err == nil:
		if wasWaiting {
			r.log.Info().Str("pin_path", r.pinPath).Msg("sessions maps are pinned again; sweeping")
		}
		daemon.Status("sweeping " + r.pinPath + " every " + r.interval.String())
	case !errors.Is(err, context.Canceled):
		daemon.Status("sweep failed: " + err.Error())
	}
	return err
}

// sweep runs one sweep over m, logs and counts it.
func (r *Reaper) sweep(ctx context.Context, m *state.Maps) error {
	start := time.Now()
	res, err := r.sweeper.Sweep(ctx, m, r.logReaped)
	took := time.Since(start)
	stopped := errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
	r.metrics.observe(res, took, err == nil)
	if err != nil && !stopped {
		r.metrics.errors.Inc()
	}
	if res.Interrupted > 0 {
		// Nothing was lost (grants repair what such a section deleted),
		// but a reaper died mid-sweep: worth a look at why.
		r.log.Warn().Int("sections", res.Interrupted).Msg("closed the deleting section of a sweep that died inside it")
	}

	if kept := res.V4.Kept + res.V6.Kept; kept > 0 {
		// Fails closed (they pass nothing), but they hold session slots.
		r.log.Warn().Int("sessions", kept).Int("tombstones_v4", res.TombsV4.Scanned-res.TombsV4.Deleted).
			Int("tombstones_v6", res.TombsV6.Scanned-res.TombsV6.Deleted).
			Msg("tombstone map full: expired sessions kept in the sessions map, dead, until there is room")
	}

	ev := r.log.Debug()
	if stopped {
		ev = r.log.Info()
	}
	ev.Int("scanned_v4", res.V4.Scanned).Int("scanned_v6", res.V6.Scanned).
		Int("reaped_idle", res.V4.Idle+res.V6.Idle).Int("reaped_lifetime", res.V4.Lifetime+res.V6.Lifetime).
		Int("regranted", res.V4.Regranted+res.V6.Regranted).Int("vanished", res.V4.Vanished+res.V6.Vanished).
		Int("tombstones_deleted", res.TombsV4.Deleted+res.TombsV6.Deleted).
		Stringer("default_idle_timeout", res.DefaultIdleTimeout).Stringer("took", took).
		Bool("complete", err == nil).Msg("sweep")
	if stopped {
		return fmt.Errorf("sweep stopped before the end: %w", err)
	}
	if err != nil {
		return fmt.Errorf("sweep %s: %w", r.pinPath, err)
	}
	return nil
}

// logReaped writes the one line per reaped session. It returns before
// building any field when info is not logged: a sweep can reap hundreds of
// thousands of sessions.
func (r *Reaper) logReaped(x *state.Reaped) {
	ev := r.log.Info()
	if ev == nil {
		return
	}
	ev.Str("user", x.User()).
		Str("proto", x.Key.Proto.String()).
		Stringer("src", x.Key.Src).
		Stringer("dst", x.Key.Dst).
		Uint16("dport", x.Key.Port).
		Stringer("idle", x.Idle.Truncate(time.Millisecond)).
		Stringer("reason", x.Cause).
		Msg("reaped session")
}

// healthy is the watchdog's check.
func (r *Reaper) healthy() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lastErr != nil {
		return r.lastErr
	}
	if since := time.Since(r.lastRun); since > 2*r.interval+time.Minute {
		return fmt.Errorf("no sweep for %s", since.Truncate(time.Second))
	}
	return nil
}

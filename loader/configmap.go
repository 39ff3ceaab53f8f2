package loader

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// writeConfig brings the allow maps and the config map to cfg. New allow
// entries go in before the config announces them and stale ones go after
// it stops counting them, so no packet sees a rule half-installed.
//
// The rules keep the ids the pinned ones have (state.CompileAllowKeeping),
// so an unchanged rule's hit count goes on. A new rule's counter is
// cleared before its id is written when no pinned rule held the id; when
// it takes over a removed rule's id, after the removed rule is gone, so
// that the new rule never starts with the old one's count (it may miss the
// packets of that moment instead).
func (l *Loader) writeConfig(maps *state.Maps, cfg *Config, allow state.AllowEntries, res *Result) error {
	prev, err := state.ReadAllowIDs(maps)
	if err != nil {
		return err
	}
	if allow, err = state.CompileAllowKeeping(cfg.Allow, prev); err != nil {
		return err
	}
	before, after := allow.FreshHitSlots(prev)
	if err := state.ZeroAllowHits(maps.AllowHits, before); err != nil {
		return err
	}
	c := state.Config{
		Controller:         cfg.Controller,
		ControllerPort:     cfg.ControllerPort,
		GRPCPort:           cfg.GRPCPort,
		DefaultIdleTimeout: cfg.RuleTimeout,
		Monitor:            cfg.Monitor,
		AllowV4Prefixes:    uint16(len(allow.V4)),
		AllowV6Prefixes:    uint16(len(allow.V6)),
		NoFlowTracking:     cfg.NoReplyTracking,
		FlowIdleTCP:        cfg.FlowIdleTCP,
		FlowIdleUDP:        cfg.FlowIdleUDP,
		FlowIdleICMP:       cfg.FlowIdleICMP,
		EventDropRate:      cfg.EventDropRate,
		NoDropEvents:       cfg.NoDropEvents,
		EventPassRate:      cfg.EventPassRate,
	}
	written, err := writeRulesAndConfig(maps, allow, c, res)
	if err != nil {
		return err
	}
	if written {
		res.ConfigWritten = true
		l.Log.Info().Stringer("controller", cfg.Controller).Uint16("controller_port", cfg.ControllerPort).
			Uint16("grpc_port", cfg.GRPCPort).Stringer("rule_timeout", cfg.RuleTimeout).Bool("monitor", cfg.Monitor).
			Bool("reply_tracking", !cfg.NoReplyTracking).
			Int("allow_prefixes", len(allow.V4)+len(allow.V6)).Msg("wrote config")
	}
	return state.ZeroAllowHits(maps.AllowHits, after)
}

// writeRulesAndConfig writes the allow rules and the config in the one
// order that never lets the data path see a config counting rules that
// are not in: the new rules in, then the config, then the stale rules out.
// It reports whether the config changed.
func writeRulesAndConfig(maps *state.Maps, allow state.AllowEntries, c state.Config, res *Result) (bool, error) {
	if err := syncAllow(maps.AllowV4, allow.V4, false, res); err != nil {
		return false, err
	}
	if err := syncAllow(maps.AllowV6, allow.V6, false, res); err != nil {
		return false, err
	}
	written, err := maps.WriteConfig(c)
	if err != nil {
		return false, err
	}
	if err := syncAllow(maps.AllowV4, allow.V4, true, res); err != nil {
		return written, err
	}
	return written, syncAllow(maps.AllowV6, allow.V6, true, res)
}

// syncAllow upserts the wanted entries that differ, or (prune) deletes the
// entries that are not wanted.
func syncAllow[K comparable](m *ebpf.Map, want map[K]bpf.AegisAllowValue, prune bool, res *Result) error {
	have := make(map[K]bpf.AegisAllowValue)
	var k K
	var v bpf.AegisAllowValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", m, err)
	}
	if prune {
		for k := range have {
			if _, ok := want[k]; !ok {
				if err := m.Delete(&k); err != nil {
					return fmt.Errorf("delete allow rule: %w", err)
				}
				res.AllowWritten = true
			}
		}
		return nil
	}
	for k, v := range want {
		if old, ok := have[k]; ok && old == v {
			continue
		}
		if err := m.Put(&k, &v); err != nil {
			return fmt.Errorf("write allow rule: %w", err)
		}
		res.AllowWritten = true
	}
	return nil
}

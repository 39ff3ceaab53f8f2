// Package guard keeps the host's fail-closed guard: an nftables table that
// drops IP traffic arriving on a configured interface whose current device
// does not verifiably run our XDP program.
//
// Why. The kernel detaches an XDP bpf_link when its device is unregistered.
// A device re-created under the same name (driver reload, hotplug,
// networkd re-creating a VLAN or a bond) runs no program until the watcher
// attaches one, and the attach syscall alone takes ~10 ms (it waits for
// RCU). A device brought up and addressed at once passes packets in that
// gap: the e2e test measured up to 61 of ~4,000 probes.
//
// Why keyed by ifindex, not installed on events. A rule per missing name,
// installed when the watcher sees the device go, only narrows the gap: the
// watcher may see the RTM_DELLINK after the new device already carries
// packets. Instead the guard permanently holds two sets:
//
//	table inet aegis_guard {
//	  set configured { type ifname }     # configured, not operator-detached
//	  set filtered   { type iface_index } # devices our XDP link is verifiably on
//	  chain prerouting {
//	    type filter hook prerouting priority raw; policy accept;
//	    <ICMPv6 133-137, code 0, hop limit 255> accept
//	    iifname @configured iif != @filtered drop
//	  }
//	}
//
// A re-created device has a new ifindex (the kernel allocates them
// cyclically and does not reuse one soon), which is not in @filtered, so
// its IP traffic is dropped from its first packet, whoever is slow. Only a
// device created with an explicit index equal to the old one ("ip link add
// ... index N") is exempt until the watcher handles the RTM_DELLINK of
// its predecessor, which withdraws that index. Its
// ifindex enters @filtered only after the XDP link is attached and netlink
// reports our program on the device (Sync is called with the verdict of
// state.Judge after the attach). A name that never had a device is
// guarded as well: iifname compares names at packet time, so it applies
// to devices created after the rule.
//
// Why inet and not netdev: a netdev chain binds to an existing device and
// dies with it, the very failure this covers. Why priority raw (-300):
// before conntrack, so a dropped packet creates no conntrack entry.
// What it cannot cover: frames that never reach the IP stack (ARP, other
// ethertypes, traffic bridged at L2 that is not passed to the bridge's IP
// hooks). IPv6 neighbour discovery is let through exactly as the data
// path lets it through, so that the re-created device can resolve
// neighbours before the filter is back; ARP passes because the inet
// family never sees it, which is also what the data path does.
//
// Staleness. The guard survives the watcher (fail closed): with the
// watcher stopped, a re-created interface stays dropped until "aegis-loader
// load" attaches it. It cannot block a filtered interface for long: every
// load and every watcher repair and resync calls Sync with the current
// verdicts, "unload -i" takes the name out of @configured, and "unload"
// removes the table. Each Sync rewrites the whole table in one nftables
// transaction, so it is idempotent and readers never see half of it.
package guard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The names of the guard's nftables objects; nothing else spells them.
const (
	TableName     = "aegis_guard"
	ChainName     = "prerouting"
	ConfiguredSet = "configured"
	FilteredSet   = "filtered"
)

// State is the content of the guard's two sets.
type State struct {
	// Configured are the names whose traffic is dropped unless it
	// arrives on a device in Filtered.
	Configured []string `json:"configured"`
	// Filtered are the ifindexes our XDP link is verifiably attached to.
	Filtered []int `json:"filtered"`
}

// Drops reports whether the guard drops IP traffic arriving on a device
// called name with ifindex (0: no such device now).
func (s State) Drops(name string, ifindex int) bool {
	return slices.Contains(s.Configured, name) && (ifindex == 0 || !slices.Contains(s.Filtered, ifindex))
}

func table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
}

func conn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	return c, nil
}

// Sync makes the guard hold exactly s, creating the table if it is
// missing, in one transaction. It works in the calling thread's network
// namespace.
func Sync(s State) error {
	for _, n := range s.Configured {
		if n == "" || len(n) >= unix.IFNAMSIZ {
			return fmt.Errorf("sync guard: bad interface name %q", n)
		}
	}
	c, err := conn()
	if err != nil {
		return err
	}
	t := c.AddTable(table())
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Name: ChainName, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw, Policy: &accept,
	})
	cfg := &nftables.Set{Table: t, Name: ConfiguredSet, KeyType: nftables.TypeIFName}
	flt := &nftables.Set{Table: t, Name: FilteredSet, KeyType: nftables.TypeIFIndex}
	for _, set := range []*nftables.Set{cfg, flt} {
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("sync guard: %w", err)
		}
		c.FlushSet(set)
	}
	var names, indexes []nftables.SetElement
	for _, n := range s.Configured {
		names = append(names, nftables.SetElement{Key: ifname(n)})
	}
	for _, i := range s.Filtered {
		indexes = append(indexes, nftables.SetElement{Key: binary.NativeEndian.AppendUint32(nil, uint32(i))})
	}
	if err := c.SetAddElements(cfg, names); err != nil {
		return fmt.Errorf("sync guard: %w", err)
	}
	if err := c.SetAddElements(flt, indexes); err != nil {
		return fmt.Errorf("sync guard: %w", err)
	}
	c.FlushChain(ch)
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: ndpAccept()})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: cfg.Name, SetID: cfg.ID},
		&expr.Meta{Key: expr.MetaKeyIIF, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: flt.Name, SetID: flt.ID, Invert: true},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("sync guard: %w", err)
	}
	return nil
}

// ndpAccept matches what the data path lets through as neighbour
// discovery: ICMPv6 types 133-137, code 0, hop limit 255.
func ndpAccept() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 7, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{255}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{137}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 1, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0}},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// Read returns the guard's sets; ok is false when there is no guard table.
func Read() (s State, ok bool, err error) {
	c, err := conn()
	if err != nil {
		return s, false, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return s, false, fmt.Errorf("read guard: %w", err)
	}
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == TableName }) {
		return s, false, nil
	}
	t := table()
	for _, name := range []string{ConfiguredSet, FilteredSet} {
		set, err := c.GetSetByName(t, name)
		if err != nil {
			return s, true, fmt.Errorf("read guard set %s: %w", name, err)
		}
		elems, err := c.GetSetElements(set)
		if err != nil {
			return s, true, fmt.Errorf("read guard set %s: %w", name, err)
		}
		for _, e := range elems {
			if name == ConfiguredSet {
				s.Configured = append(s.Configured, strings.TrimRight(string(e.Key), "\x00"))
			} else if len(e.Key) == 4 {
				s.Filtered = append(s.Filtered, int(binary.NativeEndian.Uint32(e.Key)))
			}
		}
	}
	slices.Sort(s.Configured)
	slices.Sort(s.Filtered)
	return s, true, nil
}

// Remove deletes the guard table; no table is not an error.
func Remove() error {
	c, err := conn()
	if err != nil {
		return err
	}
	c.DelTable(table())
	err = c.Flush()
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove guard: %w", err)
	}
	return nil
}

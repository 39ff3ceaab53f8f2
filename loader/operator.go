package loader

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// OperatorConnections finds the connections the operator reaches this host
// through: the SSH session named by SSH_CONNECTION (client address and
// port, server address and port) or SSH_CLIENT (no server address; the
// route to the client supplies it), and the established TCP sockets of
// every sshd ancestor of this process in the same network namespace. The
// environment can be stale or scrubbed (sudo drops it by default); the
// sockets of the sshd that spawned the shell cannot.
func detectConnections(getenv func(string) string) ([]Connection, error) {
	var out []Connection
	if f := strings.Fields(getenv("SSH_CONNECTION")); len(f) == 4 {
		if c, ok := parseSSHEnv(f[0], f[1], f[2], f[3]); ok {
			c.Source = "SSH_CONNECTION"
			out = append(out, c)
		}
	} else if f := strings.Fields(getenv("SSH_CLIENT")); len(f) == 3 {
		if c, ok := parseSSHEnv(f[0], f[1], "", f[2]); ok {
			c.Source = "SSH_CLIENT"
			out = append(out, c)
		}
	}
	socks, err := sshdSockets(os.Getpid())
	for _, s := range socks {
		dup := false
		for _, c := range out {
			dup = dup || (c.Peer == s.Peer && (c.Local == s.Local || !c.Local.Addr().IsValid()))
		}
		if !dup {
			out = append(out, s)
		}
	}
	return out, err
}

func parseSSHEnv(peer, peerPort, local, localPort string) (Connection, bool) {
	var c Connection
	pa, err1 := netip.ParseAddr(peer)
	pp, err2 := strconv.ParseUint(peerPort, 10, 16)
	lp, err3 := strconv.ParseUint(localPort, 10, 16)
	if err1 != nil || err2 != nil || err3 != nil {
		return c, false
	}
	pa = pa.Unmap().WithZone("")
	c.Peer = netip.AddrPortFrom(pa, uint16(pp))
	la, err := netip.ParseAddr(local)
	if err != nil {
		la = sourceFor(pa)
	}
	c.Local = netip.AddrPortFrom(la.Unmap().WithZone(""), uint16(lp))
	return c, c.Local.Addr().IsValid()
}

// sshdNames are the process names of OpenSSH's per-connection server
// (sshd-session since OpenSSH 9.8).
var sshdNames = []string{"sshd", "sshd-session"}

// sshdSockets walks from pid up to init and returns the established TCP
// connections held by each sshd ancestor that shares pid's network
// namespace.
func sshdSockets(pid int) ([]Connection, error) {
	self, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return nil, fmt.Errorf("read network namespace: %w", err)
	}
	var out []Connection
	for p, depth := pid, 0; p > 1 && depth < 64; depth++ {
		comm, ppid, err := procStat(p)
		if err != nil {
			return out, nil // an ancestor exited: the chain ends here
		}
		if isSSHD(comm) {
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", p)); err == nil && ns == self {
				conns, err := processTCP(p)
				if err != nil {
					return out, err
				}
				for i := range conns {
					conns[i].Source = fmt.Sprintf("sockets of %s (pid %d)", comm, p)
				}
				out = append(out, conns...)
			}
		}
		p = ppid
	}
	return out, nil
}

func isSSHD(comm string) bool {
	for _, n := range sshdNames {
		if comm == n {
			return true
		}
	}
	return false
}

// procStat returns a process's name and parent from /proc/PID/stat.
func procStat(pid int) (comm string, ppid int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, err
	}
	s := string(b)
	// comm is in parentheses and may itself contain ") ".
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return "", 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[end+1:])
	if len(f) < 2 {
		return "", 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	ppid, err = strconv.Atoi(f[1])
	return s[open+1 : end], ppid, err
}

// processTCP returns the established TCP connections whose sockets the
// process holds open: its socket inodes matched against its namespace's
// /proc/net/tcp and tcp6.
func processTCP(pid int) ([]Connection, error) {
	fds, err := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(fd)
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	if len(inodes) == 0 {
		return nil, nil
	}
	var out []Connection
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			// sl local rem st tx:rx tr:when retrnsmt uid timeout inode
			fl := strings.Fields(sc.Text())
			if len(fl) < 10 || fl[3] != "01" || !inodes[fl[9]] { // 01: ESTABLISHED
				continue
			}
			local, ok1 := parseProcAddr(fl[1])
			peer, ok2 := parseProcAddr(fl[2])
			if ok1 && ok2 {
				out = append(out, Connection{Peer: peer, Local: local})
			}
		}
		f.Close()
	}
	return out, nil
}

// parseProcAddr decodes /proc/net/tcp's "ADDR:PORT": the address as the
// kernel's 32-bit words in host (little-endian) order, the port in hex.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, false
	}
	raw, err := hex.DecodeString(a)
	port, err2 := strconv.ParseUint(p, 16, 16)
	if err != nil || err2 != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), true
}

// sourceFor is the address this host sends from to reach peer.
func sourceFor(peer netip.Addr) netip.Addr {
	rs, err := routeGet(peer)
	if err != nil || len(rs) == 0 {
		return netip.Addr{}
	}
	a, _ := netip.AddrFromSlice(rs[0].Src)
	return a.Unmap()
}

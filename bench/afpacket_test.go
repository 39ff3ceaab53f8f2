package bench

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// afPacketSend writes frame on an AF_PACKET socket bound to ifindex (in
// the calling thread's namespace), bypassing the qdisc, until d has
// passed; it returns the time taken. A full device queue drops silently.
func afPacketSend(ifindex int, frame []byte, d time.Duration) (time.Duration, error) {
	// Protocol 0: the socket sends, it never receives.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err != nil {
		return 0, fmt.Errorf("open packet socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1); err != nil {
		return 0, fmt.Errorf("bypass qdisc: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
		return 0, fmt.Errorf("bind packet socket: %w", err)
	}
	start := time.Now()
	for time.Since(start) < d {
		for range 1024 {
			if _, err := unix.Write(fd, frame); err != nil && err != unix.ENOBUFS {
				return 0, fmt.Errorf("send frame: %w", err)
			}
		}
	}
	return time.Since(start), nil
}

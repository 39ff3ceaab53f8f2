package bpf

// XDPMD is struct xdp_md, the context BPF_PROG_TEST_RUN takes for an XDP
// program: DataEnd the frame's length, IngressIfindex an interface of the
// calling thread's network namespace (the kernel resolves it there).
type XDPMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// XDPArrival is the context of frame arriving on the interface ifindex.
func XDPArrival(frame []byte, ifindex uint32) XDPMD {
	return XDPMD{DataEnd: uint32(len(frame)), IngressIfindex: ifindex}
}

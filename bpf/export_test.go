package bpf

// SetMutation breaks one rule of the model (see mutation) until the
// returned function restores it.
func SetMutation(m string) (restore func()) {
	old := mutation
	mutation = m
	return func() { mutation = old }
}

// OnFragment sets a function told of every fragmented datagram the model
// remembers.
func (env *Env) OnFragment(f func(AegisFragKey)) { env.onFragment = f }

package aegisctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/BurntSushi/toml"
	"github.com/alecthomas/kong"
)

// A profile file holds named connection settings, so that an operator
// types "aegisctl --profile gw1 sessions" instead of four flags:
//
//	default-profile = "gw1"
//
//	[profile.gw1]
//	address = "198.51.100.1"        # port 50001 if none
//	tls-cert = "ops.crt"            # relative paths: from the file's directory
//	tls-key = "ops.key"
//	tls-ca = "ca.crt"
//	server-name = "aegis-agent"
//	timeout = "5s"
//
// The keys are the flags' names. A flag or its AEGISCTL_* variable wins
// over the profile, the profile over the default. The file is refused if
// anyone but its owner may write it (it says which CA to trust), and an
// unknown key is an error rather than a silently ignored typo.
type profileFile struct {
	DefaultProfile string                    `toml:"default-profile"`
	Profile        map[string]map[string]any `toml:"profile"`
}

// DefaultConfigFile is where the profile file is looked for; "~" is the
// user's home directory.
const DefaultConfigFile = "~/.config/aegis/aegisctl.toml"

// ErrProfile means the profile file or the profile asked for is unusable.
var ErrProfile = errors.New("profile")

// loadProfiles reads and checks a profile file. A missing file is no
// error unless required.
func loadProfiles(path string, required bool) (*profileFile, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) && !required {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrProfile, err)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o: others may write it, and it says which CA to trust: chmod go-w %s",
			ErrProfile, path, fi.Mode().Perm(), path)
	}
	var pf profileFile
	md, err := toml.DecodeFile(path, &pf)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrProfile, path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, fmt.Errorf("%w: %s: unknown key %s", ErrProfile, path, und[0])
	}
	for name, p := range pf.Profile {
		for k := range p {
			if !slices.Contains(profileKeys, k) {
				return nil, fmt.Errorf("%w: %s: profile %q: unknown key %q (keys: %s)", ErrProfile, path, name, k, strings.Join(profileKeys, ", "))
			}
		}
	}
	return &pf, nil
}

// profileKeys are the keys a profile may set: the profile tags of Conn.
var profileKeys = []string{"address", "tls-cert", "tls-key", "tls-ca", "server-name", "insecure", "timeout"}

// profileResolver gives the flags tagged profile:"KEY" their value from
// the selected profile, unless the command line or the flag's variable
// set it (kong resolvers otherwise rank above the environment).
type profileResolver struct {
	once sync.Once
	// Set on the first flag resolved: the file's name, the profile's
	// name and its values, or the error.
	file, name string
	values     map[string]any
	err        error
	// resolved records the flags the profile set, for config.
	resolved map[string]bool
}

func (r *profileResolver) Validate(*kong.Application) error { return r.err }

func (r *profileResolver) Resolve(kctx *kong.Context, _ *kong.Path, flag *kong.Flag) (any, error) {
	key := flag.Tag.Get("profile")
	if key == "" {
		return nil, nil
	}
	if envSet(flag) {
		return nil, nil
	}
	r.once.Do(func() { r.load(kctx) })
	if r.err != nil || r.values == nil {
		return nil, nil
	}
	v, ok := r.values[key]
	if !ok {
		return nil, nil
	}
	if s, isString := v.(string); isString && strings.HasPrefix(key, "tls-") {
		v = r.path(s)
	}
	if r.resolved == nil {
		r.resolved = map[string]bool{}
	}
	r.resolved[flag.Name] = true
	return v, nil
}

// load reads the file named by --config and selects --profile, or the
// file's default-profile.
func (r *profileResolver) load(kctx *kong.Context) {
	value := func(name string) string {
		for _, f := range kctx.Model.Node.Flags {
			if f.Name == name {
				s, _ := kctx.FlagValue(f).(string)
				return s
			}
		}
		return ""
	}
	r.file, r.name = kong.ExpandPath(value("config")), value("profile")
	pf, err := loadProfiles(r.file, r.name != "")
	if err != nil || pf == nil {
		r.err = err
		return
	}
	if r.name == "" {
		r.name = pf.DefaultProfile
	}
	if r.name == "" {
		return
	}
	p, ok := pf.Profile[r.name]
	if !ok {
		var names []string
		for n := range pf.Profile {
			names = append(names, n)
		}
		slices.Sort(names)
		r.err = fmt.Errorf("%w: %s has no profile %q (it has: %s)", ErrProfile, r.file, r.name, strings.Join(names, ", "))
		return
	}
	r.values = p
}

// path resolves a file named in the profile: ~ is the home directory, a
// relative path is relative to the profile file.
func (r *profileResolver) path(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, strings.TrimPrefix(p, "~"))
		}
	}
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(filepath.Dir(r.file), p)
}

package state_test

import (
	"errors"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/bpf/nextbuild"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// The map names are the pin names and the names the program refers to the
// maps by; they must be exactly the object's maps.
func TestMapNamesAreTheObjects(t *testing.T) {
	var fromObject []string
	typ := reflect.TypeOf(bpf.AegisMapSpecs{})
	for i := range typ.NumField() {
		fromObject = append(fromObject, typ.Field(i).Tag.Get("ebpf"))
	}
	names := slices.Clone(state.MapNames)
	slices.Sort(names)
	slices.Sort(fromObject)
	if !slices.Equal(names, fromObject) {
		t.Fatalf("state.MapNames %v, the object's maps %v", names, fromObject)
	}

	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	var m state.Maps
	for _, name := range state.MapNames {
		if spec.Maps[name] == nil {
			t.Fatalf("map %s not in the object", name)
		}
		m.Set(name, nil)
	}
	if got := len(m.ByName()); got != 0 {
		t.Fatalf("ByName of an empty set has %d maps", got)
	}
}

func TestProgramSpecOfEachBuild(t *testing.T) {
	for name, load := range map[string]func() (*ebpf.CollectionSpec, error){
		"this": bpf.LoadAegis, "next": nextbuild.LoadAegis,
	} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		ps, err := state.ProgramSpec(spec)
		if err != nil {
			t.Fatalf("%s build: %v", name, err)
		}
		if ps.Type != ebpf.XDP {
			t.Fatalf("%s build: program %s is %v, want XDP", name, ps.Name, ps.Type)
		}
	}
}

func TestPinPaths(t *testing.T) {
	const dir = "/sys/fs/bpf/x"
	for _, c := range []struct{ got, want string }{
		{state.MapPath(dir, state.MapConfig), dir + "/config"},
		{state.ProgramPath(dir), dir + "/program"},
		{state.ProgramNextPath(dir), dir + "/program_next"},
		{state.LinksPath(dir), dir + "/links"},
		{state.LinkPath(dir, "eth0.100"), dir + "/links/eth0%2e100"},
		{state.LinkPath(dir, "a%2e"), dir + "/links/a%252e"},
	} {
		if c.got != c.want {
			t.Errorf("got %s, want %s", c.got, c.want)
		}
	}
	for _, ifname := range []string{"eth0", "eth0.100", "a%2e", "%", "x.y.z"} {
		if back := state.IfnameFromLinkPin(state.LinkPinName(ifname)); back != ifname {
			t.Errorf("%q -> %q -> %q", ifname, state.LinkPinName(ifname), back)
		}
	}
	pins := state.FilePins(dir)
	if len(pins) != 6+2*len(state.MapNames) || pins[0] != state.ProgramPath(dir) {
		t.Fatalf("FilePins %v", pins)
	}
}

// A reader does not take another user's pins for the loader's: grants
// written to a map an unprivileged user pinned would go nowhere.
func TestOpenRefusesPinsNotOwnedByRoot(t *testing.T) {
	for _, c := range []struct {
		name  string
		chown func(pin string) string
	}{
		{"pin directory", func(pin string) string { return pin }},
		{"map", func(pin string) string { return state.MapPath(pin, state.MapSessionsV6) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			pin := tu.PinDir(t)
			tu.PinMaps(t, pin, tu.PinOptions{})
			m, err := state.Open(pin, state.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			m.Close()
			path := c.chown(pin)
			if err := os.Lchown(path, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			_, err = state.Open(pin, state.OpenOptions{})
			if !errors.Is(err, state.ErrNotLoaded) || !strings.Contains(err.Error(), path+": aegis data path is not loaded: it is owned by uid 65534") {
				t.Fatalf("open after chown of %s: %v", path, err)
			}
		})
	}

	t.Run("symlink", func(t *testing.T) {
		pin := tu.PinDir(t)
		tu.PinMaps(t, pin, tu.PinOptions{})
		alias := pin + "-alias"
		if err := os.Symlink(pin, alias); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(alias) })
		if _, err := state.Open(alias, state.OpenOptions{}); !errors.Is(err, state.ErrNotLoaded) {
			t.Fatalf("open through a symlink: %v", err)
		}
	})
}

package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// checkBPFFS makes sure the nearest existing ancestor of pinPath (or
// pinPath itself) is on bpffs.
func checkBPFFS(pinPath string) error {
	dir := pinPath
	for {
		var st unix.Statfs_t
		err := unix.Statfs(dir, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("%w at %s: mount it with \"mount -t bpf bpf /sys/fs/bpf\" or point --pin-path at a bpffs directory",
					ErrNoBPFFS, dir)
			}
			return nil
		}
		if !errors.Is(err, unix.ENOENT) || dir == "/" {
			return fmt.Errorf("stat %s: %w", dir, err)
		}
		dir = filepath.Dir(dir)
	}
}

func lookupGroup(name string) (int, error) {
	if name == "" {
		return 0, nil
	}
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("%w: %q: create it (systemd-sysusers, or groupadd --system %s) or name another with --group",
			ErrNoGroup, name, name)
	}
	return strconv.Atoi(g.Gid)
}

// ensureDir creates dir if needed and (re)sets its owner and mode.
func ensureDir(dir string, mode os.FileMode, gid int) error {
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := os.Chown(dir, 0, gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}

// lockPinDir takes the pin directory's flock, creating the directory when
// create is set. It retries when the directory it locked was removed or
// replaced meanwhile (an unload ran first), so the lock it returns is on the
// directory at pinPath.
func lockPinDir(pinPath string, gid int, create bool) (*state.Lock, error) {
	for range 10 {
		if create {
			if err := os.MkdirAll(pinPath, 0o750); err != nil {
				return nil, fmt.Errorf("create %s: %w", pinPath, err)
			}
		}
		lock, err := state.LockDir(pinPath, true)
		if errors.Is(err, fs.ErrNotExist) && create {
			continue // removed between mkdir and open: an unload ran
		}
		if err != nil {
			return nil, err
		}
		var locked, current unix.Stat_t
		if unix.Fstat(int(lock.File().Fd()), &locked) == nil && unix.Stat(pinPath, &current) == nil &&
			locked.Dev == current.Dev && locked.Ino == current.Ino {
			if create {
				// Owner and mode are set under the lock, so that an unload
				// cannot remove the directory in between.
				if err := ensureDir(pinPath, 0o750, gid); err != nil {
					lock.Unlock()
					return nil, err
				}
			}
			return lock, nil
		}
		lock.Unlock()
		if !create {
			return nil, fs.ErrNotExist
		}
	}
	return nil, fmt.Errorf("lock %s: the directory keeps being replaced", pinPath)
}

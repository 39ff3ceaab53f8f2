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
				return fmt.Errorf("%w at %s: mount it with \"mount -t bpf -o mode=0700 bpf /sys/fs/bpf\" or point --pin-path at a bpffs directory",
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

// checkRoot refuses to run as another user than root, before anything is
// created: the pins must be root's, and an unprivileged run would only
// leave behind a directory of its own that squats the pin path.
func checkRoot() error {
	if uid := os.Geteuid(); uid != 0 {
		return fmt.Errorf("%w (uid %d): the pins must be root's: run aegis-loader load as root, with sudo or through aegis-loader.service",
			ErrNotRoot, uid)
	}
	return nil
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

// unsearchable returns the first directory above the pin directory that a
// member of group gid without privileges may not search, or "". The
// daemons could not open the pins through it: systemd mounts bpffs with
// mode=0700.
func unsearchable(pinPath string, gid int) string {
	var dirs []string
	for dir := filepath.Dir(pinPath); ; dir = filepath.Dir(dir) {
		dirs = append(dirs, dir)
		if dir == "/" {
			break
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		var st unix.Stat_t
		if unix.Stat(dirs[i], &st) != nil {
			return dirs[i]
		}
		if st.Mode&0o001 == 0 && (int(st.Gid) != gid || st.Mode&0o010 == 0) {
			return dirs[i]
		}
	}
	return ""
}

// pinDir is the pin directory, opened without following symlinks, checked
// (see trust.go) and locked.
type pinDir struct {
	path string
	lock *state.Lock
	// created lists the directories this run made, parents first, so that
	// a run that fails before pinning anything leaves nothing behind.
	created []string
}

func (d *pinDir) fd() int { return int(d.lock.File().Fd()) }

// Unlock releases the pin directory.
func (d *pinDir) Unlock() { d.lock.Unlock() }

// removeCreated removes the directories this run created that are still
// empty, deepest first.
func (d *pinDir) removeCreated() {
	for i := len(d.created) - 1; i >= 0; i-- {
		if err := unix.Rmdir(d.created[i]); err != nil {
			return // not empty: what is pinned there is a state the next load finishes
		}
	}
}

// lockPinDir opens and takes the pin directory's flock, creating it (and
// missing parents) when create is set, and refuses any directory on the
// way that another user could have made or could change (see trust.go).
// With create it sets the directory to 0750 root:gid under the lock, and
// then checks every entry the loader uses.
//
// It retries when the directory it locked was removed or replaced
// meanwhile (an unload ran first), so the lock it returns is on the
// directory at pinPath. Returns fs.ErrNotExist without create if there is
// no directory.
//
// notice, if given, is called once the wait for another holder of the
// lock exceeds lockNoticeAfter.
func lockPinDir(pinPath string, gid int, create bool, notice ...func(pid int)) (*pinDir, error) {
	pinPath = filepath.Clean(pinPath)
	name := filepath.Base(pinPath)
	d := &pinDir{path: pinPath}
	for range 10 {
		parent, err := openParent(pinPath, create, &d.created)
		if err != nil {
			d.removeCreated()
			return nil, err
		}
		fd, made, err := openDir(parent, pinPath, name, create, 0o700)
		if made {
			d.created = append(d.created, pinPath)
		}
		if err != nil {
			unix.Close(parent)
			d.removeCreated()
			return nil, err
		}
		var say func(int)
		if len(notice) > 0 {
			say = notice[0]
		}
		lock, err := lockWaiting(os.NewFile(uintptr(fd), pinPath), say)
		if err != nil {
			unix.Close(parent)
			d.removeCreated()
			return nil, err
		}
		var locked, current unix.Stat_t
		same := unix.Fstat(fd, &locked) == nil &&
			unix.Fstatat(parent, name, &current, unix.AT_SYMLINK_NOFOLLOW) == nil &&
			locked.Dev == current.Dev && locked.Ino == current.Ino
		unix.Close(parent)
		if !same {
			lock.Unlock()
			if !create {
				return nil, fs.ErrNotExist
			}
			continue // removed between open and lock: an unload ran
		}
		d.lock = lock
		if create {
			// Under the lock, so that an unload cannot remove the
			// directory in between; before its entries are checked, so
			// that no other user can add one after the check.
			if err := unix.Fchown(fd, 0, gid); err != nil {
				d.fail()
				return nil, fmt.Errorf("chown %s: %w", pinPath, err)
			}
			if err := unix.Fchmod(fd, 0o750); err != nil {
				d.fail()
				return nil, fmt.Errorf("chmod %s: %w", pinPath, err)
			}
		}
		if err := d.checkEntries(); err != nil {
			d.fail()
			return nil, err
		}
		return d, nil
	}
	return nil, fmt.Errorf("lock %s: the directory keeps being replaced", pinPath)
}

// fail undoes what this run created and releases the lock.
func (d *pinDir) fail() {
	d.removeCreated()
	d.Unlock()
}

// ensureSubdir creates the directory at path, an entry of the pin
// directory, if needed and (re)sets its owner and mode, through its fd.
func (d *pinDir) ensureSubdir(path string, mode uint32, gid int) error {
	name := filepath.Base(path)
	fd, _, err := openDir(d.fd(), path, name, true, mode)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, 0, gid); err != nil {
		return fmt.Errorf("chown %s: %w", path, err)
	}
	if err := unix.Fchmod(fd, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	return nil
}

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// The loader runs as root and chowns, chmods and pins under the pin path.
// bpffs mounted without mode= has a world-writable, sticky root (1777):
// any user may create names in it, though not remove or rename another
// user's. A name an attacker made first (a directory of theirs, a symlink
// to one, a map they pinned) would have root chown, chmod or pin on their
// behalf. So nothing the loader uses is trusted by name:
//
//   - Every directory from / down to the pin path's parent is opened with
//     openat(O_NOFOLLOW|O_DIRECTORY) from its parent's fd and must be owned
//     by root, and writable by other users only with the sticky bit, under
//     which they cannot replace a root-owned entry.
//   - The pin directory, the links directory and every pin the loader uses
//     must be owned by root and of the expected type (checked with
//     fstat/fstatat(AT_SYMLINK_NOFOLLOW)); a symlink is refused.
//   - A missing directory is made with mkdirat on its parent's fd, opened
//     O_NOFOLLOW and checked again, since another user may have won the
//     race to the name; owner and mode are set through the opened fd.
//   - The pin directory is made 0750 root:group under its lock before its
//     entries are checked, so from then on only root can add or replace an
//     entry. The paths the loader then gives bpf(BPF_OBJ_PIN, BPF_OBJ_GET),
//     which takes no directory fd before Linux 6.5, resolve through
//     directories only root can change.
//
// TestPinPathSquattingRefused plays each variant as uid 65534.

// checkOwned refuses an entry that is a symlink, not of kind (S_IFDIR or
// S_IFREG, as bpffs pins are), or not owned by root.
func checkOwned(path string, st *unix.Stat_t, kind uint32) error {
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return fmt.Errorf("%w: %s is a symbolic link, which aegis-loader does not follow: remove it (\"rm %s\") and load again, or give --pin-path the real path",
			ErrUnsafePinPath, path, path)
	case st.Mode&unix.S_IFMT != kind && kind == unix.S_IFDIR:
		return fmt.Errorf("%w: %s is not a directory: remove it and load again", ErrUnsafePinPath, path)
	case st.Mode&unix.S_IFMT != kind:
		return fmt.Errorf("%w: %s is not a pin: remove it and load again", ErrUnsafePinPath, path)
	case st.Uid != 0:
		return fmt.Errorf("%w: %s is owned by uid %d, not root: another user made it; check what it holds, remove it (\"rm -r %s\") and load again",
			ErrUnsafePinPath, path, st.Uid, path)
	}
	return nil
}

// checkParent refuses a directory on the way to the pin directory in which
// another user could replace the entry the loader goes through.
func checkParent(path string, st *unix.Stat_t) error {
	if err := checkOwned(path, st, unix.S_IFDIR); err != nil {
		return err
	}
	othersWrite := st.Mode&0o002 != 0 || (st.Mode&0o020 != 0 && st.Gid != 0)
	if othersWrite && st.Mode&unix.S_ISVTX == 0 {
		return fmt.Errorf("%w: %s is writable by other users and not sticky, so they could replace the pin directory: make it root's alone (\"chmod go-w %s\"; for the bpffs root, mount it with \"mount -t bpf -o mode=0700 bpf /sys/fs/bpf\")",
			ErrUnsafePinPath, path, path)
	}
	return nil
}

// openParent opens the parent of pinPath (which is clean and absolute),
// walking down from / without following symlinks and checking each
// directory before it looks inside. With create it makes missing
// directories 0755 root:root, recording them in created.
func openParent(pinPath string, create bool, created *[]string) (int, error) {
	fd, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /: %w", err)
	}
	path := "/"
	names := strings.Split(filepath.Dir(pinPath), "/")[1:] // after the leading "/"
	for i := 0; ; i++ {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("stat %s: %w", path, err)
		}
		if err := checkParent(path, &st); err != nil {
			unix.Close(fd)
			return -1, err
		}
		if i == len(names) || names[i] == "" { // "" when the parent is /
			return fd, nil
		}
		path = filepath.Join(path, names[i])
		next, made, err := openDir(fd, path, names[i], create, 0o755)
		unix.Close(fd)
		if made {
			*created = append(*created, path)
		}
		if err != nil {
			return -1, err
		}
		fd = next
		if made {
			// Traversable by the daemons whatever the umask.
			if err := unix.Fchmod(fd, 0o755); err != nil {
				unix.Close(fd)
				return -1, fmt.Errorf("chmod %s: %w", path, err)
			}
		}
	}
}

// openDir opens the directory name under dirfd (path names it in
// messages) without following a symlink, and checks that it is a directory
// owned by root. With create it first makes it with mode, and reports
// whether it did. Returns an error wrapping fs.ErrNotExist if it is missing
// and create is not set.
func openDir(dirfd int, path, name string, create bool, mode uint32) (fd int, made bool, _ error) {
	if create {
		err := unix.Mkdirat(dirfd, name, mode)
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return -1, false, fmt.Errorf("create %s: %w", path, err)
		}
		made = err == nil
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		var st unix.Stat_t
		if (errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR)) &&
			unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			if err := checkOwned(path, &st, unix.S_IFDIR); err != nil {
				return -1, made, err
			}
		}
		return -1, made, fmt.Errorf("open %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, made, fmt.Errorf("stat %s: %w", path, err)
	}
	if err := checkOwned(path, &st, unix.S_IFDIR); err != nil {
		unix.Close(fd)
		return -1, made, err
	}
	return fd, made, nil
}

// checkEntry checks the entry at path, a name under dirfd, if it exists.
func checkEntry(dirfd int, path string, kind uint32) (exists bool, err error) {
	var st unix.Stat_t
	err = unix.Fstatat(dirfd, filepath.Base(path), &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	return true, checkOwned(path, &st, kind)
}

// checkEntries refuses any entry of the pin directory the loader uses that
// another user made: the program and map pins, the sweep lock directory,
// the links directory and each link pin in it.
func (d *pinDir) checkEntries() error {
	for _, path := range state.FilePins(d.path) {
		if _, err := checkEntry(d.fd(), path, unix.S_IFREG); err != nil {
			return err
		}
	}
	if _, err := checkEntry(d.fd(), state.SweepLockPath(d.path), unix.S_IFDIR); err != nil {
		return err
	}
	links := state.LinksPath(d.path)
	ok, err := checkEntry(d.fd(), links, unix.S_IFDIR)
	if err != nil || !ok {
		return err
	}
	fd, _, err := openDir(d.fd(), links, filepath.Base(links), false, 0)
	if err != nil {
		return err
	}
	dir := os.NewFile(uintptr(fd), links)
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read %s: %w", links, err)
	}
	for _, name := range names {
		if _, err := checkEntry(fd, filepath.Join(links, name), unix.S_IFREG); err != nil {
			return err
		}
	}
	return nil
}

// setPinOwner gives the pin at path, a name under dirfd, to root:gid with
// mode. It works on an O_PATH fd of the checked inode, so no symlink is
// followed and no other file is changed.
func setPinOwner(dirfd int, path string, gid int, mode uint32) error {
	fd, err := unix.Openat(dirfd, filepath.Base(path), unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if err := checkOwned(path, &st, unix.S_IFREG); err != nil {
		return err
	}
	if err := unix.Fchownat(fd, "", 0, gid, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("chown %s: %w", path, err)
	}
	err = unix.Fchmodat(fd, "", mode, unix.AT_EMPTY_PATH)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		// fchmodat2 (Linux 6.6) is missing or filtered out; a pin cannot
		// be opened for fchmod. Change the inode the fd holds through its
		// /proc magic link, as glibc's fchmodat does.
		err = unix.Chmod(fmt.Sprintf("/proc/self/fd/%d", fd), mode)
	}
	if err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	return nil
}

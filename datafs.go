package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
)

// fileSystem is all data.go asks of the file system: the seam through
// which tests record every operation, rebuild the directory a crash
// could leave at any point, and inject errors. osFS is the real one.
type fileSystem interface {
	// mkdirAll makes the directory dir and its parents if needed.
	mkdirAll(dir string) error
	// lock takes the directory for this process alone (errLocked if
	// another has it) until the closer is closed.
	lock(dir string) (io.Closer, error)
	// create makes an empty file to append to, truncating one there.
	create(path string) (dataFile, error)
	// openAppend opens a file to append to.
	openAppend(path string) (dataFile, error)
	// open opens a file to read, and returns its size.
	open(path string) (dataFile, int64, error)
	// readDir returns the names of the files in dir.
	readDir(dir string) ([]string, error)
	// size is the size of a file.
	size(path string) (int64, error)
	rename(from, to string) error
	remove(path string) error
	truncate(path string, size int64) error
	// syncDir makes the entries of dir (creates, renames, removes)
	// durable.
	syncDir(dir string) error
}

// dataFile is an open file of the data directory.
type dataFile interface {
	io.Reader
	io.Writer
	Sync() error
	Close() error
}

// osFS is the file system itself.
type osFS struct{}

func (osFS) mkdirAll(dir string) error { return os.MkdirAll(dir, 0o755) }

func (osFS) lock(dir string) (io.Closer, error) {
	path := filepath.Join(dir, "LOCK")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := lockFile(f); err != nil {
		pid, _ := io.ReadAll(f)
		f.Close()
		if errors.Is(err, errLocked) {
			return nil, &lockedError{pid: pidOf(pid)}
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

// lockedError is lock's answer when another process has the directory.
type lockedError struct{ pid string }

func (e *lockedError) Error() string { return "locked by pid " + e.pid }

// pidOf is the process id a LOCK file holds, as text.
func pidOf(b []byte) string {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return string(b)
}

func (osFS) create(path string) (dataFile, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
}

func (osFS) openAppend(path string) (dataFile, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o644)
}

func (osFS) open(path string) (dataFile, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, fi.Size(), nil
}

func (osFS) readDir(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names, err
}

func (osFS) size(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (osFS) rename(from, to string) error           { return os.Rename(from, to) }
func (osFS) remove(path string) error               { return os.Remove(path) }
func (osFS) truncate(path string, size int64) error { return os.Truncate(path, size) }

func (osFS) syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

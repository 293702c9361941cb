//go:build unix

package main

import (
	"errors"
	"os"
	"syscall"
)

// lockFile locks f for this process alone, or returns errLocked at once.
// The lock goes with the process, so a crashed server's directory is
// free again without anyone removing a file.
func lockFile(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return errLocked
	}
	return err
}

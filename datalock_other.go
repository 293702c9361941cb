//go:build !unix

package main

import "os"

// lockFile does not lock where there is no flock(2) (Windows): one
// server per data directory is then the operator's to keep.
func lockFile(f *os.File) error { return nil }

// The key model (SPEC section 1): what a key is, and how every interface
// spells one: decoded from a URL path, escaped in an SSE id or a JSON
// string, and without its leading "/" for KvServer's clients.

package main

import (
	"fmt"
	"iter"
	"strings"
	"unicode/utf8"
)

// checkKey reports whether key is a valid key: it begins with "/", does
// not end with "/", and each component between slashes is one or more
// characters of valid UTF-8, none of them a control character, and not
// "." or "..". maxBytes bounds its length. The error names the key and
// the rule it breaks.
func checkKey(key string, maxBytes int) error {
	if why := keyProblem(key, maxBytes); why != "" {
		return fmt.Errorf("invalid key %s: %s", quoteKey(key), why)
	}
	return nil
}

// checkPath reports whether path is something a subscription or listing
// can watch: a key, a prefix ending with "/", or "/" itself.
func checkPath(path string, maxBytes int) error {
	if !strings.HasSuffix(path, "/") {
		return checkKey(path, maxBytes)
	}
	if why := pathProblem(path, maxBytes); why != "" {
		return fmt.Errorf("invalid path %s: %s", quoteKey(path), why)
	}
	return nil
}

// checkSpelled checks a key (or, if !isKey, a path) as a WebSocket client
// spelled it, and returns the store's key or path and whether the client
// spells keys KvServer's way. An error names the key as it was spelled.
func checkSpelled(spelled string, maxBytes int, isKey bool) (path string, kvserver bool, err error) {
	path, kvserver = storePath(spelled)
	what, why := "key", ""
	switch {
	case spelled == "" && isKey:
		why = "empty"
	case isKey || !strings.HasSuffix(path, "/"):
		why = keyProblem(path, maxBytes)
	default:
		what, why = "path", pathProblem(path, maxBytes)
	}
	if why != "" {
		return "", false, fmt.Errorf("invalid %s %s: %s", what, quoteKey(spelled), why)
	}
	return path, kvserver, nil
}

// pathProblem returns which rule path breaks, or "" if it is a key, a
// prefix or "/".
func pathProblem(path string, maxBytes int) string {
	switch {
	case path == "/":
		return ""
	case !strings.HasSuffix(path, "/"):
		return keyProblem(path, maxBytes)
	case len(path) > maxBytes:
		return fmt.Sprintf("longer than %d bytes", maxBytes)
	}
	return keyProblem(path[:len(path)-1], maxBytes)
}

// keyProblem returns which rule key breaks, or "" if it is a key. It is
// on every request's path, so ASCII, nearly every key's every byte, is
// checked a byte at a time without decoding.
func keyProblem(key string, maxBytes int) string {
	switch {
	case len(key) > maxBytes:
		return fmt.Sprintf("longer than %d bytes", maxBytes)
	case key == "":
		return "empty"
	case key[0] != '/':
		return `must begin with "/"`
	case key == "/":
		return `"/" is every key, not a key`
	case key[len(key)-1] == '/':
		return `ends with "/" (a prefix, not a key)`
	}
	start := 1 // of the current component
	for i := 1; i <= len(key); {
		if i == len(key) || key[i] == '/' {
			switch key[start:i] {
			case "":
				return "empty component"
			case ".", "..":
				return fmt.Sprintf("%q component", key[start:i])
			}
			i++
			start = i
			continue
		}
		c := key[i]
		if c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return fmt.Sprintf("control character U+%04X", c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(key[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			return "not valid UTF-8"
		case r <= 0x9f: // the C1 controls, U+0080–U+009F
			return fmt.Sprintf("control character U+%04X", r)
		}
		i += size
	}
	return ""
}

// covers reports whether path covers target: whether a subscription to
// path sees the changes of target, a listing of path holds it, a grant of
// path allows it. path is a key, which covers itself; a prefix ending
// with "/", which covers every key and prefix under it, and itself; or
// "/", which covers everything. target is a key, or a path to list or
// watch. It is the one statement of the rule: coveringPaths walks the same
// rule from the key's side, and client.js mirrors both (covers and
// coveringPaths there; TestCoversInJavaScript holds them to one table).
func covers(path, target string) bool {
	return path == target || strings.HasSuffix(path, "/") && strings.HasPrefix(target, path)
}

// coveringPaths yields every path that covers key, nearest first: the key
// itself, then each prefix above it, up to "/" (/a/b/c, /a/b/, /a/, /).
// Publishing looks each one up rather than asking covers of every path
// watched, so a change costs the depth of its key. Each path is a
// substring of key, so the walk allocates nothing.
func coveringPaths(key string) iter.Seq[string] {
	return func(yield func(string) bool) {
		if !yield(key) {
			return
		}
		for i := len(key) - 2; i >= 0; i-- {
			if key[i] == '/' && !yield(key[:i+1]) {
				return
			}
		}
	}
}

// quoteKey quotes a key for an error message, cutting a long one short.
func quoteKey(key string) string {
	const max = 64
	if len(key) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(key[cut]) {
			cut--
		}
		return fmt.Sprintf("%q… (%d bytes)", key[:cut], len(key))
	}
	return fmt.Sprintf("%q", key)
}

// appendKey appends a key (or path) as a JSON string. A key holds no
// control character, so only '"' and '\' need escaping, and nearly no
// key has either.
func appendKey(b []byte, key string) []byte {
	b = append(b, '"')
	for {
		i := strings.IndexAny(key, `"\`)
		if i < 0 {
			break
		}
		b = append(b, key[:i]...)
		b = append(b, '\\', key[i])
		key = key[i+1:]
	}
	b = append(b, key...)
	return append(b, '"')
}

// appendIDKey appends a key as the first field of an SSE id, with "%"
// and ":" written "%25" and "%3A", so that the id has exactly the colons
// that separate its fields, which come after the key.
func appendIDKey(b []byte, key string) []byte {
	for {
		i := strings.IndexAny(key, "%:")
		if i < 0 {
			break
		}
		b = append(b, key[:i]...)
		if key[i] == '%' {
			b = append(b, "%25"...)
		} else {
			b = append(b, "%3A"...)
		}
		key = key[i+1:]
	}
	return append(b, key...)
}

// storePath returns the store key or path a WebSocket client means:
// KvServer's clients name keys without the leading "/" ("foo", "room/"),
// which are the store's "/foo" and "/room/". It reports whether the
// client spelled it that way, so replies can spell keys back alike.
func storePath(spelled string) (path string, kvserver bool) {
	if strings.HasPrefix(spelled, "/") {
		return spelled, false
	}
	return "/" + spelled, true
}

// spell returns a store key as a client that spells keys KvServer's way
// (kvserver) or the store's own way names it.
func spell(key string, kvserver bool) string {
	if kvserver {
		return key[1:]
	}
	return key
}

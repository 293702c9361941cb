// Access control (SPEC 9): tokens scoped to paths, read from -tokens,
// and what a request without a token may do (-public). Without -tokens
// the server is open, as both seeds are, and nothing here runs. Each
// route declares the permission it needs (routes, in http.go); authorize
// checks it. Also the -origins list (SPEC 7), which cors enforces.

package main

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync/atomic"
)

// perm is what a request may do: nothing, read, or write (which
// includes read).
type perm uint8

const (
	permNone perm = iota
	permRead
	permWrite
)

func (p perm) String() string {
	switch p {
	case permRead:
		return "read"
	case permWrite:
		return "write"
	}
	return "none"
}

// publicFlag is the -public flag: what a request without a token may do.
type publicFlag struct {
	p   perm
	set bool // given on the command line or in the environment
}

func (f *publicFlag) String() string { return f.p.String() }

func (f *publicFlag) Set(s string) error {
	switch s {
	case "none":
		f.p = permNone
	case "read":
		f.p = permRead
	case "write":
		f.p = permWrite
	default:
		return fmt.Errorf("want none, read or write")
	}
	f.set = true
	return nil
}

// A grant lets a token read or write a path: a key, a prefix ending with
// "/", or "/" (every key).
type grant struct {
	perm perm
	path string
}

// allows reports whether g lets its token do p on path: a key, or a
// prefix to list or watch. A grant reaches what its path covers.
func (g grant) allows(path string, p perm) bool {
	return p <= g.perm && covers(g.path, path)
}

// tokenDigest is the SHA-256 of a token: what the table holds and the
// lookup compares, never the token itself.
type tokenDigest [sha256.Size]byte

// tokenTable is one reading of the -tokens file: each token's grants.
type tokenTable map[tokenDigest][]grant

// parseTokens reads a -tokens file: per line `<token> <read|write>
// <path>...`; blank lines and lines starting with # are skipped. A token
// on several lines has all their grants. An error names the file and
// line, and never quotes a token.
func parseTokens(name string, r io.Reader, maxKeyBytes int) (tokenTable, error) {
	t := make(tokenTable)
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) < 3 {
			return nil, fmt.Errorf("%s:%d: want <token> <read|write> <path>...", name, line)
		}
		var p perm
		switch fields[1] {
		case "read":
			p = permRead
		case "write":
			p = permWrite
		default:
			return nil, fmt.Errorf("%s:%d: permission %q: want read or write", name, line, fields[1])
		}
		d := tokenDigest(sha256.Sum256([]byte(fields[0])))
		for _, path := range fields[2:] {
			if err := checkPath(path, maxKeyBytes); err != nil {
				return nil, fmt.Errorf("%s:%d: %v: want a key, a prefix ending with /, or /", name, line, err)
			}
			t[d] = append(t[d], grant{p, path})
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %v", name, err)
	}
	return t, nil
}

// access decides who may do what. The table is swapped whole on reload,
// so a check loads one pointer and takes no lock.
type access struct {
	file        string
	public      perm
	maxKeyBytes int
	table       atomic.Pointer[tokenTable]
}

// newAccess reads the -tokens file; nil if there is none (all open).
func newAccess(cfg config) (*access, error) {
	if cfg.tokens == "" {
		return nil, nil
	}
	a := &access{file: cfg.tokens, public: cfg.public.p, maxKeyBytes: cfg.maxKeyBytes}
	if _, err := a.reload(); err != nil {
		return nil, err
	}
	return a, nil
}

// reload reads the file again and, if it is good, puts it in force; a bad
// file leaves the old table in force. It returns the new table.
func (a *access) reload() (tokenTable, error) {
	f, err := os.Open(a.file)
	if err != nil {
		return nil, fmt.Errorf("-tokens: %v", err)
	}
	defer f.Close()
	t, err := parseTokens(a.file, f, a.maxKeyBytes)
	if err != nil {
		return nil, err
	}
	a.table.Store(&t)
	return t, nil
}

// A caller is who sent a request: the digest of its token, if it sent one.
type caller struct {
	token  bool
	digest tokenDigest
}

// callerOf reads a request's token: "Authorization: Bearer <token>", or
// "?token=" (which is all EventSource and browser WebSockets can send).
func callerOf(r *http.Request) caller {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok && strings.Contains(r.URL.RawQuery, "token=") {
		for part := range strings.SplitSeq(r.URL.RawQuery, "&") {
			if v, ok := strings.CutPrefix(part, "token="); ok {
				tok, _ = url.QueryUnescape(v)
				break
			}
		}
	}
	if tok == "" {
		return caller{}
	}
	return caller{token: true, digest: sha256.Sum256([]byte(tok))}
}

// An identity is who opened a stream or WebSocket, and what their token
// allowed when they did.
type identity struct {
	caller
	grants []grant
}

// identify returns r's identity, for a stream to keep.
func (s *server) identify(r *http.Request) identity {
	if s.access == nil {
		return identity{}
	}
	c := callerOf(r)
	g, _ := s.access.grants(c)
	return identity{c, g}
}

// accessError is a refusal: 401 (no token where one is needed, or an
// unknown one) or 403 (a token that does not allow it).
type accessError struct {
	code int
	msg  string
}

func (e *accessError) Error() string { return e.msg }

var errUnknownToken = &accessError{http.StatusUnauthorized, "unknown token"}

// grants returns the grants of c's token, or an error if it has one that
// is unknown.
//
// Tokens are never compared themselves: the table is keyed by their
// SHA-256 digests, so the time a lookup takes depends on the digest of
// what was sent, which tells an attacker nothing about any token (the
// constant-time comparison of crypto/subtle answers the same threat, for
// one secret at a time; a map keyed by digests does it for many in one
// lookup).
func (a *access) grants(c caller) ([]grant, *accessError) {
	if !c.token {
		return nil, nil
	}
	g, ok := (*a.table.Load())[c.digest]
	if !ok {
		return nil, errUnknownToken
	}
	return g, nil
}

// allow returns nil if c may do p on path (a key, or a prefix to list or
// watch), else why not. What the public may do, a known token may do
// too.
func (a *access) allow(c caller, path string, p perm) *accessError {
	if a == nil || (!c.token && p <= a.public) {
		return nil
	}
	grants, err := a.grants(c)
	if err != nil {
		return err // an unknown token is refused even where none is needed
	}
	if p <= a.public {
		return nil
	}
	if !c.token {
		return &accessError{http.StatusUnauthorized, fmt.Sprintf(
			"missing token: %s %s needs one (Authorization: Bearer …, or ?token=…)", doing(p), quoteKey(path))}
	}
	for _, g := range grants {
		if g.allows(path, p) {
			return nil
		}
	}
	return &accessError{http.StatusForbidden, fmt.Sprintf("this token may not %s %s", p, quoteKey(path))}
}

func doing(p perm) string {
	if p == permWrite {
		return "writing"
	}
	return "reading"
}

// connect returns nil if c may open a WebSocket: with a known token, or
// without one if the public may do anything. Each message is then
// checked on its own.
func (a *access) connect(c caller) *accessError {
	if a == nil {
		return nil
	}
	if _, err := a.grants(c); err != nil {
		return err
	}
	if !c.token && a.public == permNone {
		return &accessError{http.StatusUnauthorized, "missing token: a WebSocket needs one (?token=…, or Authorization: Bearer …)"}
	}
	return nil
}

// authorize checks that the caller of r may do what its route needs on
// target, which targetOf derived; if not it answers 401 or 403 and
// returns why. With -tokens it computes one SHA-256 per request that
// sends a token.
func (s *server) authorize(w http.ResponseWriter, r *http.Request, rt *route, target string) outcome {
	if s.access == nil || rt.perm == permNone {
		return outcomeOK
	}
	s.trace("access", rt, target)
	if err := s.access.allow(callerOf(r), target, rt.perm); err != nil {
		return s.serveFailure(w, rt.api, err)
	}
	return outcomeOK
}

// parseOrigins reads the -origins list: "*" (any origin: nil), or origins
// separated by commas, each scheme://host[:port] as a browser sends it in
// Origin (or "null", the origin of sandboxed pages and files, only if
// listed). An empty list allows no page at all: only requests without
// Origin.
func parseOrigins(list string) (map[string]bool, error) {
	if strings.TrimSpace(list) == "*" {
		return nil, nil
	}
	origins := make(map[string]bool)
	for o := range strings.SplitSeq(list, ",") {
		o = strings.TrimSpace(o)
		if o == "" {
			continue
		}
		if o != "null" {
			u, err := url.Parse(o)
			if err != nil || u.Scheme == "" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
				return nil, fmt.Errorf("-origins: %q is not an origin: want scheme://host[:port], e.g. https://app.example, or *", o)
			}
			o = strings.ToLower(u.Scheme + "://" + u.Host) // as browsers send it
		}
		origins[o] = true
	}
	return origins, nil
}

// reloadTokens reads -tokens again (on SIGHUP). A bad file keeps the old
// table and logs why. Streams and WebSockets whose token was removed, or
// whose grants changed, are closed: their clients reconnect and are
// checked afresh. The others go on.
func (s *server) reloadTokens() {
	t, err := s.access.reload()
	if err != nil {
		s.log.Error("tokens not reloaded; the old ones stay in force", "err", err)
		return
	}
	closed := s.streams.closeIf(func(st *stream) bool {
		return st.who.token && !slices.Equal(st.who.grants, t[st.who.digest])
	})
	s.log.Info("tokens reloaded", "file", s.access.file, "tokens", len(t), "streams_closed", closed)
}

// redactQuery returns a raw query with the value of token elided, for
// logs.
func redactQuery(raw string) string {
	if !strings.Contains(raw, "token=") {
		return raw
	}
	parts := strings.Split(raw, "&")
	for i, part := range parts {
		if strings.HasPrefix(part, "token=") {
			parts[i] = "token=…"
		}
	}
	return strings.Join(parts, "&")
}

package main

// Tests of the keyspace in order (SPEC 3a): listings paged with ?limit,
// ?after and the Link header, ?shallow, X-Seq, and the WebSocket list with
// the same parameters.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// listItem is one item of a listing: a key's version, or with ?shallow a
// deeper prefix.
type listItem struct {
	Key      string          `json:"key"`
	Value    json.RawMessage `json:"value"`
	Revision int64           `json:"revision"`
	Prefix   string          `json:"prefix"`
}

// name is what an item is ordered by: its key, or its prefix.
func (it listItem) name() string {
	if it.Prefix != "" {
		return it.Prefix
	}
	return it.Key
}

// listPage is one answer of a listing: its items, its X-Seq, and the URL
// of the next page its Link names ("" if none).
type listPage struct {
	items []listItem
	seq   int64
	next  string
}

var linkNext = regexp.MustCompile(`^<([^>]*)>; rel="next"$`)

// getPage GETs a listing, which must answer 200 with an X-Seq, and a Link
// only of the form RFC 8288 gives.
func getPage(t testing.TB, url string, headers ...string) listPage {
	t.Helper()
	resp := do(t, "GET", url, "", headers...)
	if resp.code != 200 {
		t.Fatalf("GET %s: got %d %s; want 200", url, resp.code, resp.body)
	}
	var p listPage
	if err := json.Unmarshal([]byte(resp.body), &p.items); err != nil {
		t.Fatalf("GET %s: %v: %s", url, err, resp.body)
	}
	seq, err := strconv.ParseInt(resp.header.Get("X-Seq"), 10, 64)
	if err != nil {
		t.Fatalf("GET %s: X-Seq %q: %v", url, resp.header.Get("X-Seq"), err)
	}
	p.seq = seq
	if link := resp.header.Values("Link"); len(link) > 0 {
		m := linkNext.FindStringSubmatch(link[0])
		if len(link) > 1 || m == nil {
			t.Fatalf("GET %s: Link %q; want one <URL>; rel=\"next\"", url, link)
		}
		p.next = m[1]
	}
	return p
}

// allPages lists path from base, page after page, following each Link
// until a page has none; between pages it calls between (if not nil). It
// returns the pages.
func allPages(t testing.TB, base, path string, between func(), headers ...string) []listPage {
	t.Helper()
	var pages []listPage
	for next := path; next != ""; {
		p := getPage(t, base+next, headers...)
		pages = append(pages, p)
		if len(pages) > 100_000 {
			t.Fatalf("%s: more than 100,000 pages", path)
		}
		next = p.next
		if next != "" && between != nil {
			between()
		}
	}
	return pages
}

// names returns the names of items of pages, in order.
func names(pages ...listPage) []string {
	var ns []string
	for _, p := range pages {
		for _, it := range p.items {
			ns = append(ns, it.name())
		}
	}
	return ns
}

// escapePath percent-encodes each component of a key or prefix, as a
// client puts it in a URL.
func escapePath(p string) string {
	parts := strings.Split(p, "/")
	for i := range parts {
		parts[i] = url.PathEscape(parts[i])
	}
	return strings.Join(parts, "/")
}

// TestListPaging: a prefix listed page by page, following each page's
// Link, gives every key that is there throughout exactly once, in key
// order, while writers add and delete other keys between (and during)
// pages; a key added or deleted meanwhile comes at most once. Keys with
// spaces, ":", "%", "+", "&", "?", "#" and non-ASCII characters go
// through the Link's after and back; so does a prefix that holds such
// characters. Only the last page has no Link.
func TestListPaging(t *testing.T) {
	srv, base := newTestServer(t)
	for _, prefix := range []string{"/p/", "/sp ace:ключ%/"} {
		stable := []string{
			prefix + "k0010 space", prefix + "k0020:colon", prefix + "k0030%pct", prefix + "k0031%25",
			prefix + "k0040+plus&and=eq", prefix + "k0050?q#h", prefix + "k0060ключ", prefix + "k0070😀",
			prefix + "k0080\"quote\\",
		}
		for i := range 150 {
			stable = append(stable, fmt.Sprintf("%sk%04da", prefix, i*2+100))
		}
		for _, k := range stable {
			srv.store.Set(k, `"stable"`, 0)
		}
		slices.Sort(stable)
		// Volatile keys sort between the stable ones: /p/k0100b after
		// /p/k0100a, and so on.
		volatile := func(i int) string { return fmt.Sprintf("%sk%04db", prefix, i%400) }
		var round atomic.Int64
		between := func() {
			r := int(round.Add(1))
			for j := range 5 {
				k := volatile(r*7 + j*31)
				if (r+j)%2 == 0 {
					srv.store.Set(k, `"volatile"`, 0)
				} else {
					srv.store.Delete(k, -1)
				}
			}
			srv.store.Set(stable[r%len(stable)], strconv.Itoa(r), 0) // a stable key changes, and stays
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { // and a writer that runs during the pages too
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if i%3 == 0 {
					srv.store.Delete(volatile(i*13), -1)
				} else {
					srv.store.Set(volatile(i*13), `"v"`, 0)
				}
			}
		}()
		for _, limit := range []int{1, 7, 100, 10_000} {
			t.Run(fmt.Sprintf("%s limit=%d", prefix, limit), func(t *testing.T) {
				pages := allPages(t, base, fmt.Sprintf("%s?limit=%d", escapePath(prefix), limit), between)
				got := names(pages...)
				for i := 1; i < len(got); i++ {
					if got[i-1] >= got[i] {
						t.Fatalf("item %d %q after %q: want strictly increasing keys across pages", i, got[i], got[i-1])
					}
				}
				seen := 0
				for _, k := range got {
					switch {
					case slices.Contains(stable, k):
						seen++
					case !strings.HasSuffix(k, "b") || !strings.HasPrefix(k, prefix+"k"):
						t.Errorf("listed %q, which was never written", k)
					}
				}
				if seen != len(stable) {
					t.Errorf("%d of the %d keys there throughout were listed; want every one, once", seen, len(stable))
				}
				for i, p := range pages {
					switch {
					case len(p.items) > limit:
						t.Errorf("page %d: %d items; want at most %d", i, len(p.items), limit)
					case i < len(pages)-1 && len(p.items) != limit:
						t.Errorf("page %d of %d: %d items and a Link; want %d", i, len(pages), len(p.items), limit)
					case i > 0 && p.seq < pages[i-1].seq:
						t.Errorf("page %d: X-Seq %d, below the page before's %d", i, p.seq, pages[i-1].seq)
					}
				}
				t.Logf("%d pages, %d items, %d keys there throughout", len(pages), len(got), seen)
			})
		}
		close(stop)
		wg.Wait()
	}
}

// TestListPagingQuiet: paging over a store that does not change: a page
// is exactly the items after after, up to limit; the Link is there only
// when more follow (not on a last page that is full), and its URL, asked
// again, gives the same page; after may name a missing key, or any key
// outside the prefix.
func TestListPagingQuiet(t *testing.T) {
	srv, base := newTestServer(t)
	keys := []string{"/q/a", "/q/a b", "/q/a%", "/q/a+b", "/q/a:b", "/q/b/c", "/q/b0", "/q/ключ", "/q/😀", "/q0", "/p"}
	for _, k := range keys {
		srv.store.Set(k, `1`, 0)
	}
	under := []string{"/q/a", "/q/a b", "/q/a%", "/q/a+b", "/q/a:b", "/q/b/c", "/q/b0", "/q/ключ", "/q/😀"}
	slices.Sort(under)
	for _, tt := range []struct {
		name, after string
		want        []string
	}{
		{"no after", "", under},
		{"empty after", "&after=", under},
		{"present key", "&after=" + url.QueryEscape("/q/a b"), under[slices.Index(under, "/q/a b")+1:]},
		{"missing key", "&after=" + url.QueryEscape("/q/a!"), under[slices.Index(under, "/q/a%"):]},
		{"missing key past the last", "&after=" + url.QueryEscape("/q/😀😀"), nil},
		{"key before the prefix", "&after=/p", under},
		{"key after the prefix", "&after=/q0", nil},
		{"key under a deeper prefix", "&after=" + url.QueryEscape("/q/b/c"), under[slices.Index(under, "/q/b0"):]},
		{"the prefix without its slash", "&after=/q", under},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, limit := range []int{1, 2, len(under), 10_000} {
				pages := allPages(t, base, fmt.Sprintf("/q/?limit=%d%s", limit, tt.after), nil)
				if got := names(pages...); !slices.Equal(got, tt.want) {
					t.Errorf("limit %d: got %q; want %q", limit, got, tt.want)
				}
				if want := max(1, (len(tt.want)+limit-1)/limit); len(pages) != want {
					t.Errorf("limit %d: %d pages; want %d (no Link on a full last page)", limit, len(pages), want)
				}
			}
		})
	}

	t.Run("Link", func(t *testing.T) {
		p := getPage(t, base+"/q/?limit=2&after="+url.QueryEscape("/q/a b"))
		want := "/q/?limit=2&after=" + url.QueryEscape("/q/a+b")
		if p.next != want {
			t.Errorf("Link: got %q; want %q", p.next, want)
		}
		u, err := url.Parse(p.next)
		if err != nil {
			t.Fatal(err)
		}
		if got := u.Query().Get("after"); got != "/q/a+b" {
			t.Errorf("the Link's after reads %q; want the page's last key %q", got, "/q/a+b")
		}
		again := getPage(t, base+p.next)
		if got, want := names(again), under[slices.Index(under, "/q/a+b")+1:][:2]; !slices.Equal(got, want) {
			t.Errorf("the Link's page: got %q; want %q", got, want)
		}
		if again2 := getPage(t, base+p.next); !slices.Equal(names(again2), names(again)) || again2.next != again.next {
			t.Errorf("the Link's URL asked twice: %q then %q", names(again), names(again2))
		}
	})

	t.Run("everything", func(t *testing.T) {
		all := append(slices.Clone(keys), "/sync")
		srv.store.Set("/sync", `1`, 0)
		slices.Sort(all)
		pages := allPages(t, base, "/?limit=3", nil, "Accept", "application/json")
		if got := names(pages...); !slices.Equal(got, all) {
			t.Errorf("GET /?limit=3 with Accept: application/json, page after page: got %q; want %q", got, all)
		}
		if !strings.HasPrefix(pages[0].next, "/?limit=3&after=") {
			t.Errorf("its Link: %q; want /?limit=3&after=…", pages[0].next)
		}
	})
}

// TestListBadQuery: a bad limit or after is 400, with a message that
// names it; a limit from 1 to 10,000 is fine.
func TestListBadQuery(t *testing.T) {
	_, base := newTestServer(t)
	for _, tt := range []struct {
		query, names string
	}{
		{"limit", "limit"},
		{"limit=", "limit"},
		{"limit=0", "limit"},
		{"limit=-1", "limit"},
		{"limit=10001", "limit"},
		{"limit=99999999999999999999", "limit"},
		{"limit=1.5", "limit"},
		{"limit=ten", "limit"},
		{"limit=%205", "limit"},
		{"limit=0x10", "limit"},
		{"after=a", "after"},
		{"after=/a/", "after"},
		{"after=/a//b", "after"},
		{"after=/a/..", "after"},
		{"after=/a%01", "after"},
		{"after=%FF", "after"},
		{"after=/", "after"},
		{"shallow&after=/a//", "after"},
		{"shallow&after=a/", "after"},
		{"limit=5&after=/a/", "after"},
		{"limit=0&after=/a", "limit"},
	} {
		for _, path := range []string{"/a/", "/"} {
			resp := do(t, "GET", base+path+"?"+tt.query, "", "Accept", "application/json")
			if msg := errorMessage(resp); resp.code != 400 || !strings.Contains(msg, tt.names) {
				t.Errorf("GET %s?%s: got %d %s; want 400 naming %s", path, tt.query, resp.code, resp.body, tt.names)
			}
		}
	}
	for _, query := range []string{"limit=1", "limit=10000", "limit=007", "after=", "after=/a", "shallow", "shallow&after=/a/b/", "shallow&after=/", "limit=1&limit=x"} {
		if resp := do(t, "GET", base+"/a/?"+query, ""); resp.code != 200 {
			t.Errorf("GET /a/?%s: got %d %s; want 200", query, resp.code, resp.body)
		}
	}
}

// TestXSeq: every GET of a key (a 404 too) and every listing (whole,
// paged, shallow, of everything) carries X-Seq, at least the seq of every
// change acknowledged before the request, here a transaction's.
func TestXSeq(t *testing.T) {
	_, base := newTestServer(t)
	for i := range 20 {
		resp := do(t, "POST", base+"/", fmt.Sprintf(`{"ops":[{"op":"set","key":"/x/%d","value":%d},{"op":"delete","key":"/x/%d"}]}`, i, i, i-1))
		var done struct{ Seq int64 }
		if err := json.Unmarshal([]byte(resp.body), &done); err != nil || resp.code != 200 {
			t.Fatalf("transaction: %d %s", resp.code, resp.body)
		}
		for _, req := range []struct {
			path    string
			headers []string
		}{
			{fmt.Sprintf("/x/%d", i), nil},
			{fmt.Sprintf("/x/%d", i-1), nil}, // 404
			{"/x/", nil},
			{"/x/?limit=1", nil},
			{"/x/?shallow", nil},
			{"/?shallow&limit=1", []string{"Accept", "application/json"}},
			{"/", []string{"Accept", "application/json"}},
		} {
			resp := do(t, "GET", base+req.path, "", req.headers...)
			seq, err := strconv.ParseInt(resp.header.Get("X-Seq"), 10, 64)
			if err != nil || seq < done.Seq {
				t.Errorf("GET %s (%d): X-Seq %q; want at least %d, the seq of the transaction acknowledged before", req.path, resp.code, resp.header.Get("X-Seq"), done.Seq)
			}
		}
	}
}

// shallowModel is what a shallow listing of prefix over keys must give:
// each key directly under prefix, and each deeper prefix once, ordered
// by their names (a prefix's keys all sort together, where the prefix
// itself sorts: "/a/b/…" before "/a/b0", "/a/b." before "/a/b/…").
func shallowModel(keys []string, prefix string) []string {
	set := map[string]bool{}
	for _, k := range keys {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			set[prefix+rest[:i+1]] = true
		} else {
			set[k] = true
		}
	}
	var items []string
	for n := range set {
		items = append(items, n)
	}
	slices.Sort(items)
	return items
}

// shallowAfter is shallowModel of the keys after after: a shallow
// listing from after starts after that key in the keyspace; a prefix as
// after (a prefix item's) skips every key under it too. A key under a
// deeper prefix as after brings that prefix again if keys after it are
// under it, as the keys after after do.
func shallowAfter(keys []string, prefix, after string) []string {
	var rest []string
	for _, k := range keys {
		if k > after && !(strings.HasSuffix(after, "/") && strings.HasPrefix(k, after)) {
			rest = append(rest, k)
		}
	}
	return shallowModel(rest, prefix)
}

// shallowKeys are nested prefixes with the byte boundaries around "/":
// "." (0x2E) and "-" sort before it, "0" (0x30) after it.
var shallowKeys = []string{
	"/a/1", "/a/b", "/a/b-", "/a/b.x", "/a/b/1", "/a/b/2", "/a/b/c/1", "/a/b/c/d/1", "/a/b0", "/a/b0/1",
	"/a/c/1", "/a/ключ/1", "/a/😀", "/a/z", "/a0", "/a.", "/b/1",
}

// TestListShallow: ?shallow gives the direct keys and each deeper prefix
// once, in key order, over nested prefixes and the "/" vs "0" boundary;
// paged with limit 1 to 3 by its Links, and from after a prefix item
// (which skips every key under it) or a key, present or not.
func TestListShallow(t *testing.T) {
	srv, base := newTestServer(t)
	keys := slices.Clone(shallowKeys)
	for i := range 600 { // more under /a/b/ than one read of the index
		keys = append(keys, fmt.Sprintf("/a/b/many/%03d", i))
	}
	for _, k := range keys {
		srv.store.Set(k, `1`, 0)
	}
	for _, prefix := range []string{"/", "/a/", "/a/b/", "/a/b/c/", "/a/b0/", "/a/ключ/", "/none/"} {
		want := shallowModel(keys, prefix)
		path := escapePath(prefix)
		var headers []string
		if prefix == "/" {
			headers = []string{"Accept", "application/json"}
		}
		if got := names(getPage(t, base+path+"?shallow", headers...)); !slices.Equal(got, want) {
			t.Errorf("%s?shallow: got %q; want %q", prefix, got, want)
		}
		for limit := 1; limit <= 3; limit++ {
			pages := allPages(t, base, fmt.Sprintf("%s?shallow&limit=%d", path, limit), nil, headers...)
			if got := names(pages...); !slices.Equal(got, want) {
				t.Errorf("%s?shallow&limit=%d, page after page: got %q; want %q", prefix, limit, got, want)
			}
			for _, p := range pages {
				if p.next != "" && !strings.Contains(p.next, "shallow") {
					t.Errorf("%s?shallow&limit=%d: Link %q is not shallow", prefix, limit, p.next)
				}
			}
			// From after each item, and after names that are no item.
			afters := slices.Clone(want)
			for _, n := range want {
				afters = append(afters, n+"!", strings.TrimSuffix(n, "/")+"0/", n+"1")
			}
			for _, after := range afters {
				if !strings.HasPrefix(after, prefix) {
					continue
				}
				q := fmt.Sprintf("%s?shallow&limit=%d&after=%s", path, limit, url.QueryEscape(after))
				if got, want := names(allPages(t, base, q, nil, headers...)...), shallowAfter(keys, prefix, after); !slices.Equal(got, want) {
					t.Errorf("%s: got %q; want %q", q, got, want)
				}
			}
		}
	}
	// The items themselves: a prefix item is {"prefix"} and nothing else.
	got := do(t, "GET", base+"/a/b/?shallow", "").body
	want := `[{"key":"/a/b/1","value":1,"revision":0},{"key":"/a/b/2","value":1,"revision":0},{"prefix":"/a/b/c/"},{"prefix":"/a/b/many/"}]`
	if got != want {
		t.Errorf("GET /a/b/?shallow: got %s; want %s", got, want)
	}
}

// TestListShallowRandom: shallow listings of random trees, paged with
// random limits and from random items, against the model.
func TestListShallowRandom(t *testing.T) {
	srv, base := newTestServer(t)
	rng := rand.New(rand.NewPCG(1, 2))
	parts := []string{"a", "b", "b0", "b.", "b-", "c", "é", "z"}
	var keys []string
	for range 300 {
		k := ""
		for d := 1 + rng.IntN(4); d > 0; d-- {
			k += "/" + parts[rng.IntN(len(parts))]
		}
		if _, ok := slices.BinarySearch(keys, k); ok {
			continue
		}
		keys = append(keys, k)
		slices.Sort(keys)
		srv.store.Set(k, `1`, 0)
	}
	prefixes := []string{"/"}
	for _, k := range keys {
		for i := 1; i < len(k); i++ {
			if k[i] == '/' && !slices.Contains(prefixes, k[:i+1]) {
				prefixes = append(prefixes, k[:i+1])
			}
		}
	}
	for _, prefix := range prefixes {
		want := shallowModel(keys, prefix)
		limit := 1 + rng.IntN(4)
		after := ""
		switch rng.IntN(3) {
		case 0: // an item, key or prefix
			if len(want) > 0 {
				after = want[rng.IntN(len(want))]
			}
		case 1: // any key under the prefix, deeper ones too
			if under := slices.DeleteFunc(slices.Clone(keys), func(k string) bool { return !strings.HasPrefix(k, prefix) }); len(under) > 0 {
				after = under[rng.IntN(len(under))]
			}
		}
		q := fmt.Sprintf("%s?shallow&limit=%d&after=%s", escapePath(prefix), limit, url.QueryEscape(after))
		if got, want := names(allPages(t, base, q, nil, "Accept", "application/json")...), shallowAfter(keys, prefix, after); !slices.Equal(got, want) {
			t.Errorf("%s: got %q; want %q", q, got, want)
		}
	}
}

// rawWS is a WebSocket spoken frame by frame, so that a test sees how a
// message is cut: x/net/websocket's Message codec returns each frame of
// a message in fragments as a message of its own.
type rawWS struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func dialRawWS(t testing.TB, url string) *rawWS {
	t.Helper()
	conn, r := dialRaw(t, url)
	return &rawWS{t, conn, r}
}

func (c *rawWS) send(msg string) {
	c.t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write(clientFrame(true, opText, []byte(msg))); err != nil {
		c.t.Fatalf("send %s: %v", msg, err)
	}
}

// read returns the next message, its fragments joined, and how many
// frames it came in. A ping is answered; a frame that breaks the order of
// fragments (a new message before the last one's final frame, a
// continuation of nothing) fails the test.
func (c *rawWS) read() (msg []byte, frames int) {
	c.t.Helper()
	for {
		c.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		var h [2]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			c.t.Fatalf("after %d frames of a message: %v", frames, err)
		}
		if h[0]&0x70 != 0 || h[1]&0x80 != 0 {
			c.t.Fatalf("server frame header % x: want no reserved bit, no mask", h)
		}
		fin, op := h[0]&0x80 != 0, h[0]&0x0f
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var ext [2]byte
			io.ReadFull(c.r, ext[:])
			n = uint64(ext[0])<<8 | uint64(ext[1])
		case 127:
			var ext [8]byte
			io.ReadFull(c.r, ext[:])
			n = 0
			for _, b := range ext {
				n = n<<8 | uint64(b)
			}
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			c.t.Fatal(err)
		}
		switch {
		case op == opPing:
			c.conn.Write(clientFrame(true, opPong, payload))
			continue
		case op == opPong:
			continue
		case op == opClose:
			c.t.Fatalf("close frame % x after %d frames of a message", payload, frames)
		case op == opText && frames > 0:
			c.t.Fatalf("a text frame inside a message in fragments, after %d of them: %.100s", frames, payload)
		case op == opContinuation && frames == 0:
			c.t.Fatalf("a continuation frame with no message to continue: %.100s", payload)
		case op != opText && op != opContinuation:
			c.t.Fatalf("frame opcode %#x", op)
		}
		msg = append(msg, payload...)
		frames++
		if fin {
			return msg, frames
		}
	}
}

// TestWebSocketList: list with limit, after and shallow, under both
// spellings of keys; without any of them the reply is the bare array
// KvServer clients expect, with any it is {items, seq, next?}, next
// being the after of the next page, spelled as the prefix.
func TestWebSocketList(t *testing.T) {
	srv, base := newTestServer(t)
	for _, k := range []string{"/room/a", "/room/b", "/room/c/1", "/room/c/2", "/room/d", "/room0", "/other"} {
		srv.store.Set(k, `1`, 0)
	}
	c := dialWS(t, base, "")
	item := func(key string) string { return fmt.Sprintf(`{"key":%q,"value":1,"revision":0}`, key) }
	for _, tt := range []struct{ payload, want string }{
		{`{"prefix":"/room/"}`, `[` + strings.Join([]string{item("/room/a"), item("/room/b"), item("/room/c/1"), item("/room/c/2"), item("/room/d")}, ",") + `]`},
		{`{"prefix":"room/"}`, `[` + strings.Join([]string{item("room/a"), item("room/b"), item("room/c/1"), item("room/c/2"), item("room/d")}, ",") + `]`},
		{`{"prefix":"room"}`, `[` + strings.Join([]string{item("room/a"), item("room/b"), item("room/c/1"), item("room/c/2"), item("room/d")}, ",") + `]`},
		{`{"prefix":"/room/c/","limit":10}`, `{"items":[` + item("/room/c/1") + `,` + item("/room/c/2") + `],"seq":_}`},
		{`{"prefix":"/room/","limit":2}`, `{"items":[` + item("/room/a") + `,` + item("/room/b") + `],"seq":_,"next":"/room/b"}`},
		{`{"prefix":"room/","limit":2}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `],"seq":_,"next":"room/b"}`},
		{`{"prefix":"room/","limit":2,"after":"room/b"}`, `{"items":[` + item("room/c/1") + `,` + item("room/c/2") + `],"seq":_,"next":"room/c/2"}`},
		{`{"prefix":"room/","limit":2,"after":"room/c/2"}`, `{"items":[` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","limit":1,"after":"/room/c/2"}`, `{"items":[` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","after":"/room/bb"}`, `{"items":[` + item("/room/c/1") + `,` + item("/room/c/2") + `,` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","after":""}`, `{"items":[` + strings.Join([]string{item("/room/a"), item("/room/b"), item("/room/c/1"), item("/room/c/2"), item("/room/d")}, ",") + `],"seq":_}`},
		{`{"prefix":"/room/","shallow":true}`, `{"items":[` + item("/room/a") + `,` + item("/room/b") + `,{"prefix":"/room/c/"},` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"room/","shallow":true}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `,{"prefix":"room/c/"},` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"room/","shallow":true,"limit":3}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `,{"prefix":"room/c/"}],"seq":_,"next":"room/c/"}`},
		{`{"prefix":"room/","shallow":true,"limit":3,"after":"room/c/"}`, `{"items":[` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","shallow":true,"limit":1,"after":"/room/b"}`, `{"items":[{"prefix":"/room/c/"}],"seq":_,"next":"/room/c/"}`},
		{`{"prefix":"/none/","limit":5}`, `{"items":[],"seq":_}`},
		{`{"prefix":"/none/"}`, `[]`},
		{`{"prefix":"/room/","limit":0}`, `"list: invalid limit \"0\": want an integer from 1 to 10000"`},
		{`{"prefix":"/room/","limit":10001}`, `"list: invalid limit \"10001\": want an integer from 1 to 10000"`},
		{`{"prefix":"/room/","after":"/room/c/"}`, `"list: invalid after: invalid key \"/room/c/\": ends with \"/\" (a prefix, not a key)"`},
		{`{"prefix":"/room/","after":"room/a"}`, `"list: invalid after: invalid key \"room/a\": must begin with \"/\""`},
	} {
		msg := fmt.Sprintf(`{"type":"list","payload":%s,"id":7}`, tt.payload)
		want := fmt.Sprintf(`{"type":"values","payload":%s,"id":7}`, tt.want)
		if strings.HasPrefix(tt.want, `"`) {
			want = fmt.Sprintf(`{"type":"error","payload":%s,"id":7}`, tt.want)
		}
		c.roundTrip(msg, want)
	}

	t.Run("pages", func(t *testing.T) {
		for _, prefix := range []string{"/room/", "room/", "/"} {
			for limit := 1; limit <= 3; limit++ {
				var got []string
				after := ""
				for pages := 0; ; pages++ {
					c.send(fmt.Sprintf(`{"type":"list","payload":{"prefix":%q,"limit":%d,"after":%q}}`, prefix, limit, after))
					var reply struct {
						Payload struct {
							Items []listItem
							Seq   int64
							Next  *string
						}
					}
					if err := json.Unmarshal([]byte(c.recvRaw()), &reply); err != nil || reply.Payload.Seq == 0 {
						t.Fatalf("prefix %q: %v, seq %d", prefix, err, reply.Payload.Seq)
					}
					for _, it := range reply.Payload.Items {
						got = append(got, it.name())
					}
					if reply.Payload.Next == nil {
						break
					}
					after = *reply.Payload.Next
				}
				want := []string{"/other", "/room/a", "/room/b", "/room/c/1", "/room/c/2", "/room/d", "/room0"}
				if strings.HasPrefix(prefix, "/room") || strings.HasPrefix(prefix, "room") {
					want = want[1:6]
				}
				if !strings.HasPrefix(prefix, "/") {
					for i := range want {
						want[i] = want[i][1:]
					}
				}
				if !slices.Equal(got, want) {
					t.Errorf("prefix %q limit %d, page after page: got %q; want %q", prefix, limit, got, want)
				}
			}
		}
	})
}

// TestWebSocketListRootSpelling: a list prefix "" is KvServer's spelling
// of "/" (SPEC 5: a list prefix that does not begin with "/" is a
// KvServer key; docs/websocket.md says so of ""), so its keys come
// without the leading slash, as for "room/" and for a subscription to "".
func TestWebSocketListRootSpelling(t *testing.T) {
	srv, base := newTestServer(t)
	srv.store.Set("/a", `1`, 0)
	c := dialWS(t, base, "")
	c.roundTrip(`{"type":"list","payload":{"prefix":""},"id":1}`, `{"type":"values","payload":[{"key":"a","value":1,"revision":0}],"id":1}`)
	c.roundTrip(`{"type":"list","payload":{"prefix":"","limit":1},"id":2}`, `{"type":"values","payload":{"items":[{"key":"a","value":1,"revision":0}],"seq":_},"id":2}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"","initial":true},"id":3}`, `{"type":"ok","payload":{"key":""},"id":3}`)
	if got, want := c.recv(), `{"type":"value","payload":{"key":"a","value":1,"revision":0,"seq":_}}`; got != want {
		t.Errorf("subscribe \"\" with initial: got %s; want %s", got, want)
	}
}

// TestWebSocketListBadTypes: a list whose limit, after or shallow has the
// wrong JSON type gets an error that says what it must be.
func TestWebSocketListBadTypes(t *testing.T) {
	_, base := newTestServer(t)
	c := dialWS(t, base, "")
	for _, tt := range []struct{ payload, want string }{
		{`{"prefix":"/","limit":"5"}`, `list: \"limit\" must be an integer`},
		{`{"prefix":"/","limit":1.5}`, `list: \"limit\" must be an integer`},
		{`{"prefix":"/","shallow":"yes"}`, `list: \"shallow\" must be true or false`},
		{`{"prefix":"/","after":5}`, `list: \"after\" must be a string`},
	} {
		c.roundTrip(fmt.Sprintf(`{"type":"list","payload":%s,"id":1}`, tt.payload), fmt.Sprintf(`{"type":"error","payload":"%s","id":1}`, tt.want))
	}
}

// TestWebSocketListLarge: a list of more than 1,000 keys (of a prefix,
// and of everything, paged or not, under both spellings) is one message,
// sent in several fragments, every key in key order; on a connection
// that watches the prefix while another client writes it, no event comes
// between the fragments, and a request sent right after the list is
// answered after the whole of it.
func TestWebSocketListLarge(t *testing.T) {
	srv, base := newTestServer(t)
	const n = 1500
	rng := rand.New(rand.NewPCG(3, 4))
	var want []string
	for _, i := range rng.Perm(n) { // written out of order
		k := fmt.Sprintf("/big/%04d-%s", i, strings.Repeat("x", i%50))
		srv.store.Set(k, fmt.Sprintf(`{"i":%d}`, i), 0)
		want = append(want, k)
	}
	srv.store.Set("/big0", `0`, 0)
	slices.Sort(want)

	c := dialRawWS(t, base)
	c.send(`{"type":"subscribe","payload":{"key":"/big/"},"id":"sub"}`)
	if msg, _ := c.read(); string(msg) != `{"type":"ok","payload":{"key":"/big/"},"id":"sub"}` {
		t.Fatalf("subscribe: %s", msg)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // writes the prefix all along: events for c
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			srv.store.Set(fmt.Sprintf("/big/%04d-w", i%n), `"w"`, 0)
			srv.store.Delete(fmt.Sprintf("/big/%04d-w", (i+n/2)%n), -1)
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	for _, tt := range []struct {
		payload string
		paged   bool
		spell   func(string) string
	}{
		{`{"prefix":"/big/"}`, false, func(k string) string { return k }},
		{`{"prefix":"big/"}`, false, func(k string) string { return k[1:] }},
		{`{"prefix":"/big/","limit":10000}`, true, func(k string) string { return k }},
		{`{"prefix":"big/","limit":1499,"after":""}`, true, func(k string) string { return k[1:] }},
		{`{"prefix":"/"}`, false, func(k string) string { return k }},
	} {
		c.send(fmt.Sprintf(`{"type":"list","payload":%s,"id":"list"}`, tt.payload))
		c.send(`{"type":"get","payload":{"key":"/after"},"id":"get"}`)
		var msg []byte
		var frames int
		for { // events of the subscription may come first
			msg, frames = c.read()
			if strings.Contains(string(msg), `"id":"list"`) {
				break
			}
			if !strings.HasPrefix(string(msg), `{"type":"value"`) && !strings.HasPrefix(string(msg), `{"type":"no-value"`) {
				t.Fatalf("list %s: before its reply: %.200s", tt.payload, msg)
			}
		}
		var reply struct {
			Type    string
			Payload json.RawMessage
		}
		if err := json.Unmarshal(msg, &reply); err != nil || reply.Type != "values" {
			t.Fatalf("list %s: %v: %.200s…", tt.payload, err, msg)
		}
		var items []listItem
		var page struct {
			Items []listItem
			Seq   int64
			Next  *string
		}
		if tt.paged {
			if err := json.Unmarshal(reply.Payload, &page); err != nil || page.Seq == 0 {
				t.Fatalf("list %s: %v, seq %d", tt.payload, err, page.Seq)
			}
			items = page.Items
		} else if err := json.Unmarshal(reply.Payload, &items); err != nil {
			t.Fatalf("list %s: %v", tt.payload, err)
		}
		var got []string
		for _, it := range items {
			if !strings.HasSuffix(it.Key, "-w") {
				got = append(got, it.Key)
			}
		}
		for i := 1; i < len(items); i++ {
			if items[i-1].Key >= items[i].Key {
				t.Fatalf("list %s: %q after %q: want key order", tt.payload, items[i].Key, items[i-1].Key)
			}
		}
		wantHere := make([]string, 0, len(want)+2)
		if tt.payload == `{"prefix":"/"}` {
			wantHere = append(wantHere, want...)
			wantHere = append(wantHere, "/big0")
			got = slices.DeleteFunc(got, func(k string) bool { return !strings.HasPrefix(k, "/big") })
		} else {
			for _, k := range want {
				wantHere = append(wantHere, tt.spell(k))
			}
		}
		if strings.Contains(tt.payload, "1499") {
			// At most 1499 items, written keys among them: compare what
			// is there and ask for the rest with next.
			if page.Next == nil {
				t.Errorf("list %s: no next, with more keys to come", tt.payload)
			}
			wantHere = wantHere[:len(got)]
		}
		if !slices.Equal(got, wantHere) {
			t.Errorf("list %s: %d keys, want %d, in key order", tt.payload, len(got), len(wantHere))
		}
		if frames < 2 {
			t.Errorf("list %s: one frame of %d bytes; want a message in fragments", tt.payload, len(msg))
		}
		for { // the get, after the list; events of the subscription may come between
			m, _ := c.read()
			if strings.Contains(string(m), `"id":"get"`) {
				break
			}
		}
		t.Logf("list %s: %d items, %d bytes, in %d frames", tt.payload, len(items), len(msg), frames)
	}
}

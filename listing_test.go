package main

// Tests of the keyspace in order (SPEC 3a) over HTTP: listings paged
// with ?limit, ?after and the Link header, ?shallow, X-Seq. The WebSocket
// list is wslist_test.go's.

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
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

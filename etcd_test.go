package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The etcd client against real etcd clusters, which startEtcd starts and
// stops: the harness the cluster's later tests share. Never a mock: what
// the gateway does is the thing under test.

// An etcdCluster is etcd members a test runs on loopback ports.
type etcdCluster struct {
	t       *testing.T
	members []*etcdMember
	tls     *tls.Config   // of the clients, for https members
	clients []*etcdClient // one per member, made on first use
}

// An etcdMember is one etcd process, restartable with its data.
type etcdMember struct {
	name, client string // client: its client URL
	args         []string
	log          string // its output, across restarts
	cmd          *exec.Cmd
	exited       chan struct{} // closed when the process has ended
}

var etcdClusters atomic.Int64 // for cluster tokens unique in this process

// startEtcd starts a cluster of members (1, 3, …) on free loopback ports,
// with data under t.TempDir(), waits until every member serves, and
// stops it when the test ends. flags are added to every member's (e.g.
// "--auto-compaction-mode", "revision"). Without etcd the test skips,
// except on CI (CI set), where it fails.
func startEtcd(t *testing.T, members int, flags ...string) *etcdCluster {
	t.Helper()
	return startEtcdTLS(t, members, nil, flags...)
}

// startEtcdTLS is startEtcd with https client URLs when clientTLS is not
// nil: flags then name the members' certificates (--cert-file,
// --key-file, --trusted-ca-file, --client-cert-auth), and clientTLS is
// what the harness's own clients use.
func startEtcdTLS(t *testing.T, members int, clientTLS *tls.Config, flags ...string) *etcdCluster {
	t.Helper()
	bin := needTool(t, "etcd", "etcd-server")
	scheme := "http"
	if clientTLS != nil {
		scheme = "https"
	}
	// A port picked free can be taken before etcd binds it: then the
	// member exits at once, and the cluster starts again on other ports.
	for attempt := 1; ; attempt++ {
		c := &etcdCluster{t: t, tls: clientTLS, clients: make([]*etcdClient, members)}
		dir := t.TempDir()
		token := fmt.Sprintf("atomkv-%d-%d", os.Getpid(), etcdClusters.Add(1))
		var initial []string
		for i := range members {
			m := &etcdMember{name: fmt.Sprintf("m%d", i), log: filepath.Join(dir, fmt.Sprintf("m%d.log", i))}
			m.client = fmt.Sprintf("%s://127.0.0.1:%d", scheme, freePort(t))
			peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
			m.args = []string{
				"--name", m.name, "--data-dir", filepath.Join(dir, m.name),
				"--listen-client-urls", m.client, "--advertise-client-urls", m.client,
				"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
				"--initial-cluster-state", "new", "--initial-cluster-token", token,
				"--heartbeat-interval", "50", "--election-timeout", "500",
				"--unsafe-no-fsync", "--logger", "zap", "--log-outputs", "stderr",
			}
			initial = append(initial, m.name+"="+peer)
			c.members = append(c.members, m)
		}
		for _, m := range c.members {
			m.args = append(append(m.args, "--initial-cluster", strings.Join(initial, ",")), flags...)
			m.args = append([]string{bin}, m.args...)
		}
		t.Cleanup(c.stopAll)
		err := c.launch(c.indexes()...)
		if err == nil {
			return c
		}
		c.stopAll()
		if attempt == 3 || !c.logged("address already in use") {
			t.Fatal(err) // the cleanup shows the members' logs
		}
	}
}

// launch starts the processes of members and waits until they serve.
func (c *etcdCluster) launch(members ...int) error {
	c.t.Helper()
	for _, i := range members {
		c.exec(i)
	}
	return c.waitServing(members)
}

func (c *etcdCluster) indexes() []int {
	var all []int
	for i := range c.members {
		all = append(all, i)
	}
	return all
}

// exec starts member i's process.
func (c *etcdCluster) exec(i int) {
	c.t.Helper()
	m := c.members[i]
	out, err := os.OpenFile(m.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	defer out.Close()
	m.cmd = exec.Command(m.args[0], m.args[1:]...)
	m.cmd.Env = []string{"PATH=" + os.Getenv("PATH")} // no ETCD_* setting of the caller's
	m.cmd.Stdout, m.cmd.Stderr = out, out
	if err := m.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	m.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		cmd.Wait()
		close(exited)
	}(m.cmd, m.exited)
}

// waitServing polls members until each serves a linearizable read, which
// needs a leader.
func (c *etcdCluster) waitServing(members []int) error {
	deadline := time.Now().Add(30 * time.Second)
	for _, i := range members {
		m := c.members[i]
		for {
			select {
			case <-m.exited:
				return fmt.Errorf("etcd member %s exited", m.name)
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := c.client(i).rangeKeys(ctx, etcdRange{Key: []byte("/")})
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("etcd member %s does not serve: %v", m.name, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// client returns a client of member i alone.
func (c *etcdCluster) client(i int) *etcdClient {
	if c.clients[i] == nil {
		cl, err := newEtcdClient([]string{c.members[i].client}, c.tls)
		if err != nil {
			c.t.Fatal(err)
		}
		cl.retryDown = 10 * time.Millisecond
		c.clients[i] = cl
	}
	return c.clients[i]
}

// newClient returns a client of every member, in order.
func (c *etcdCluster) newClient() *etcdClient {
	cl, err := newEtcdClient(c.endpoints(), c.tls)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(cl.close)
	return cl
}

// endpoints returns the members' client URLs.
func (c *etcdCluster) endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.client)
	}
	return eps
}

func (c *etcdCluster) running(i int) bool {
	m := c.members[i]
	if m.cmd == nil {
		return false
	}
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

// kill ends member i with SIGKILL, as a crash would.
func (c *etcdCluster) kill(i int) {
	if c.running(i) {
		c.members[i].cmd.Process.Kill()
		<-c.members[i].exited
	}
}

// stop ends member i with SIGTERM, and SIGKILL if it has not ended after
// ten seconds.
func (c *etcdCluster) stop(i int) {
	if !c.running(i) {
		return
	}
	m := c.members[i]
	m.cmd.Process.Signal(syscall.SIGCONT) // a paused member would not see SIGTERM
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(10 * time.Second):
		m.cmd.Process.Kill()
		<-m.exited
	}
}

// start restarts members on their data, and waits until they serve: a
// member without a quorum does not, so start together the members that
// make one.
func (c *etcdCluster) start(members ...int) {
	c.t.Helper()
	var stopped []int
	for _, i := range members {
		if !c.running(i) {
			stopped = append(stopped, i)
		}
	}
	if err := c.launch(stopped...); err != nil {
		c.t.Fatal(err)
	}
}

// pause stops member i with SIGSTOP: it still accepts connections (the
// kernel does), and answers nothing, as a member that hangs. resume
// undoes it.
func (c *etcdCluster) pause(i int)  { c.members[i].cmd.Process.Signal(syscall.SIGSTOP) }
func (c *etcdCluster) resume(i int) { c.members[i].cmd.Process.Signal(syscall.SIGCONT) }

func (c *etcdCluster) stopAll() {
	for i := range c.members {
		c.stop(i)
		if c.clients[i] != nil {
			c.clients[i].close()
		}
	}
	if c.t.Failed() {
		c.dumpLogs()
	}
}

// memberID returns member i's id, as answers' headers name it.
func (c *etcdCluster) memberID(i int) uint64 {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.client(i).status(ctx)
	if err != nil {
		c.t.Fatal(err)
	}
	return st.Header.MemberID
}

// leader returns the index of the member that leads, once one does.
func (c *etcdCluster) leader() int {
	c.t.Helper()
	leader := -1
	waitFor(c.t, "an etcd leader", func() bool {
		for i := range c.members {
			if !c.running(i) {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := c.client(i).status(ctx)
			cancel()
			if err == nil && st.Leader != 0 && st.Leader == st.Header.MemberID {
				leader = i
				return true
			}
		}
		return false
	})
	return leader
}

// compact drops the history before rev.
func (c *etcdCluster) compact(rev int64) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.newClient().compact(ctx, rev); err != nil {
		c.t.Fatal(err)
	}
}

// logged says whether a member's output holds s.
func (c *etcdCluster) logged(s string) bool {
	for _, m := range c.members {
		if b, _ := os.ReadFile(m.log); bytes.Contains(b, []byte(s)) {
			return true
		}
	}
	return false
}

// dumpLogs logs the end of every member's output.
func (c *etcdCluster) dumpLogs() {
	for _, m := range c.members {
		b, _ := os.ReadFile(m.log)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		c.t.Logf("etcd %s (%s), last lines:\n%s", m.name, m.client, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
}

// etcdCtx returns a context for one request: the deadline is a hang
// breaker, not a timing assertion.
func etcdCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// etcdPutAll puts key=value pairs in one txn and returns its revision.
func etcdPutAll(t *testing.T, c *etcdClient, kv ...string) int64 {
	t.Helper()
	var txn etcdTxn
	for i := 0; i < len(kv); i += 2 {
		txn.Success = append(txn.Success, etcdOp{Put: &etcdPut{Key: []byte(kv[i]), Value: []byte(kv[i+1])}})
	}
	resp, err := c.txn(etcdCtx(t), txn)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// TestEtcdRangePages: a prefix of 2,500 keys read in pages, all at the
// revision of the first, while keys change between pages.
func TestEtcdRangePages(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1).newClient()
	var want []string
	for i := 0; i < 2500; i += 100 {
		var kv []string
		for j := i; j < i+100; j++ {
			k := fmt.Sprintf("/p/%04d", j)
			kv = append(kv, k, "v"+k)
			want = append(want, k)
		}
		etcdPutAll(t, c, kv...)
	}
	etcdPutAll(t, c, "/o", "outside", "/p", "the prefix itself is outside /p/")

	prefix := []byte("/p/")
	var got []string
	pages := 0
	rev, err := c.rangePages(etcdCtx(t), prefix, etcdPrefixEnd(prefix), 1000, func(kvs []etcdKV) error {
		pages++
		for _, kv := range kvs {
			if string(kv.Value) != "v"+string(kv.Key) {
				t.Errorf("%s = %q", kv.Key, kv.Value)
			}
			got = append(got, string(kv.Key))
		}
		// Changes after the first page are not in the pages after it.
		etcdPutAll(t, c, fmt.Sprintf("/p/%04d", 2500+pages), "new", "/p/0000", "changed")
		_, err := c.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{{Delete: &etcdDelete{Key: []byte("/p/2499")}}}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if pages != 3 || strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("got %d pages, %d keys (%v … %v); want 3 pages, the 2,500 keys", pages, len(got), got[:2], got[len(got)-2:])
	}

	now, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: prefix, RangeEnd: etcdPrefixEnd(prefix), Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if now.Header.Revision <= rev || !now.More || now.Count != 2502 || len(now.KVs) != 10 {
		t.Errorf("range limit 10: revision %d (paged at %d), more %v, count %d, %d kvs; want a later revision, more, 2502, 10",
			now.Header.Revision, rev, now.More, now.Count, len(now.KVs))
	}
	old, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/p/0000"), Revision: rev})
	if err != nil {
		t.Fatal(err)
	}
	if len(old.KVs) != 1 || string(old.KVs[0].Value) != "v/p/0000" || old.Header.Revision != now.Header.Revision {
		t.Errorf("range at %d: %+v; want the old value, and the header at the current revision", rev, old)
	}
	count, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/nothing/"), RangeEnd: etcdPrefixEnd([]byte("/nothing/")), CountOnly: true})
	if err != nil || count.Count != 0 || count.KVs != nil || count.More {
		t.Errorf("empty range: %+v, %v; want count 0 (left out), no kvs", count, err)
	}
}

func TestEtcdPrefixEnd(t *testing.T) {
	for _, tc := range []struct{ prefix, want string }{
		{"/a/", "/a0"},
		{"a", "b"},
		{"a\xff", "b"},
		{"a\xff\xff", "b"},
		{"\xff\xff", "\x00"},
		{"", "\x00"},
	} {
		if got := string(etcdPrefixEnd([]byte(tc.prefix))); got != tc.want {
			t.Errorf("etcdPrefixEnd(%q) = %q; want %q", tc.prefix, got, tc.want)
		}
	}
}

func TestEtcdEndpoints(t *testing.T) {
	for _, eps := range [][]string{nil, {"127.0.0.1:2379"}, {"http://"}, {"ftp://h:1"}, {"http://h:1/v3"}} {
		if _, err := newEtcdClient(eps, nil); err == nil {
			t.Errorf("newEtcdClient(%q) accepted", eps)
		}
	}
	c, err := newEtcdClient([]string{"http://a:1/", "https://b:2"}, nil)
	if err != nil || strings.Join(c.endpoints, " ") != "http://a:1 https://b:2" {
		t.Errorf("newEtcdClient: %v, %v", c.endpoints, err)
	}
}

// TestEtcdTxn: a txn's compares, each target, and its branches: success
// applies its writes at one revision, failure reads the keys as they are.
func TestEtcdTxn(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1).newClient()
	a, b := []byte("/t/a"), []byte("/t/b")
	rev1 := etcdPutAll(t, c, "/t/a", "1")

	// A conditional create and update, as AtomKV's CAS: a at version 1, b missing.
	cas := etcdTxn{
		Compare: []etcdCompare{{Target: "VERSION", Key: a, Version: 1}, {Target: "CREATE", Key: b}},
		Success: []etcdOp{{Put: &etcdPut{Key: a, Value: []byte("2"), PrevKV: true}}, {Put: &etcdPut{Key: b, Value: []byte("x")}}},
		Failure: []etcdOp{{Range: &etcdRange{Key: a}}, {Range: &etcdRange{Key: b}}},
	}
	ok, err := c.txn(etcdCtx(t), cas)
	if err != nil {
		t.Fatal(err)
	}
	if !ok.Succeeded || ok.Header.Revision != rev1+1 || len(ok.Responses) != 2 || ok.Responses[0].Put == nil ||
		ok.Responses[0].Put.PrevKV == nil || string(ok.Responses[0].Put.PrevKV.Value) != "1" || ok.Responses[1].Put == nil {
		t.Fatalf("first txn: %+v; want success at revision %d with a's previous value", ok, rev1+1)
	}
	again, err := c.txn(etcdCtx(t), cas)
	if err != nil {
		t.Fatal(err)
	}
	if again.Succeeded || again.Header.Revision != ok.Header.Revision || len(again.Responses) != 2 {
		t.Fatalf("second txn: %+v; want failure at revision %d", again, ok.Header.Revision)
	}
	ga, gb := again.Responses[0].Range.KVs, again.Responses[1].Range.KVs
	if len(ga) != 1 || string(ga[0].Value) != "2" || ga[0].Version != 2 || ga[0].CreateRevision != rev1 || ga[0].ModRevision != ok.Header.Revision ||
		len(gb) != 1 || string(gb[0].Value) != "x" || gb[0].Version != 1 || gb[0].CreateRevision != ok.Header.Revision {
		t.Fatalf("failure branch: a %+v, b %+v; want the current kvs", ga, gb)
	}

	mod := ok.Header.Revision
	for _, tc := range []struct {
		name string
		cmp  etcdCompare
		want bool
	}{
		{"version equal", etcdCompare{Target: "VERSION", Key: a, Version: 2}, true},
		{"version equal, stale", etcdCompare{Target: "VERSION", Key: a, Version: 1}, false},
		{"version of a missing key", etcdCompare{Target: "VERSION", Key: []byte("/t/none")}, true},
		{"create of a missing key", etcdCompare{Target: "CREATE", Key: []byte("/t/none")}, true},
		{"create of a present key", etcdCompare{Target: "CREATE", Key: a}, false},
		{"mod equal", etcdCompare{Target: "MOD", Key: a, ModRevision: mod}, true},
		{"mod less", etcdCompare{Result: "LESS", Target: "MOD", Key: a, ModRevision: mod}, false},
		{"mod greater", etcdCompare{Result: "GREATER", Target: "MOD", Key: a, ModRevision: mod - 1}, true},
		{"version not equal", etcdCompare{Result: "NOT_EQUAL", Target: "VERSION", Key: a, Version: 2}, false},
		{"lease none", etcdCompare{Target: "LEASE", Key: a}, true},
		{"value", etcdCompare{Target: "VALUE", Key: a, Value: []byte("2")}, true},
		{"value differs", etcdCompare{Target: "VALUE", Key: a, Value: []byte("1")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := c.txn(etcdCtx(t), etcdTxn{Compare: []etcdCompare{tc.cmp}})
			if err != nil || resp.Succeeded != tc.want {
				t.Errorf("got %v, %v; want %v", resp.Succeeded, err, tc.want)
			}
		})
	}

	del, err := c.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{
		{Delete: &etcdDelete{Key: []byte("/t/"), RangeEnd: etcdPrefixEnd([]byte("/t/")), PrevKV: true}},
		{Delete: &etcdDelete{Key: []byte("/t/none")}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if d := del.Responses[0].Delete; d == nil || d.Deleted != 2 || len(d.PrevKVs) != 2 || string(d.PrevKVs[1].Value) != "x" {
		t.Errorf("delete of /t/: %+v; want 2 deleted, with their values", d)
	}
	if d := del.Responses[1].Delete; d == nil || d.Deleted != 0 {
		t.Errorf("delete of a missing key: %+v; want 0 deleted", d)
	}
}

// TestEtcdRefusals: what etcd refuses is recognisable, and never an
// unknown outcome: it was not applied.
func TestEtcdRefusals(t *testing.T) {
	t.Parallel()
	cl := startEtcd(t, 1)
	c := cl.newClient()
	put := func(key string, value []byte) etcdOp { return etcdOp{Put: &etcdPut{Key: []byte(key), Value: value}} }
	var many []etcdOp
	for i := range 129 {
		many = append(many, put(fmt.Sprintf("/r/%d", i), nil))
	}
	rev := etcdPutAll(t, c, "/r/a", "1")
	etcdPutAll(t, c, "/r/a", "2")
	cl.compact(rev + 1)

	for _, tc := range []struct {
		name string
		do   func(ctx context.Context) error
		want error
	}{
		{"put of 1.6 MiB", func(ctx context.Context) error {
			_, err := c.txn(ctx, etcdTxn{Success: []etcdOp{put("/r/big", make([]byte, 1600<<10))}})
			return err
		}, errEtcdTooLarge},
		{"put of 3 MiB: gRPC refuses it", func(ctx context.Context) error {
			_, err := c.txn(ctx, etcdTxn{Success: []etcdOp{put("/r/big", make([]byte, 3<<20))}})
			return err
		}, errEtcdTooLarge},
		{"txn of 129 ops", func(ctx context.Context) error {
			_, err := c.txn(ctx, etcdTxn{Success: many})
			return err
		}, errEtcdTooManyOps},
		{"a key twice in a txn", func(ctx context.Context) error {
			_, err := c.txn(ctx, etcdTxn{Success: []etcdOp{put("/r/d", nil), put("/r/d", nil)}})
			return err
		}, errEtcdDuplicateKey},
		{"range at a compacted revision", func(ctx context.Context) error {
			_, err := c.rangeKeys(ctx, etcdRange{Key: []byte("/r/a"), Revision: rev})
			return err
		}, errEtcdCompacted},
		{"revoke of an unknown lease", func(ctx context.Context) error { return c.leaseRevoke(ctx, 12345) }, errEtcdLeaseNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.do(etcdCtx(t))
			var e *etcdError
			if !errors.Is(err, tc.want) || !errors.Is(err, errEtcdRefused) || errors.Is(err, errOutcomeUnknown) || !errors.As(err, &e) {
				t.Fatalf("got %v; want %v, a refusal", err, tc.want)
			}
			t.Logf("gRPC code %d, HTTP %d: %s", e.Code, e.Status, e.Message)
		})
	}
	if resp, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/r/"), RangeEnd: []byte("/r0"), CountOnly: true}); err != nil || resp.Count != 1 {
		t.Errorf("after the refusals: %d keys, %v; want /r/a alone", resp.Count, err)
	}
}

// etcdWatchOf opens a watch of prefix; the test's end closes it, and so
// does a guard long after anything should have come, so that a missing
// message fails the test rather than hangs it.
func etcdWatchOf(t *testing.T, c *etcdClient, prefix string, from int64) *etcdWatch {
	t.Helper()
	w, err := c.watch(etcdCtx(t), etcdWatchCreate{Key: []byte(prefix), RangeEnd: etcdPrefixEnd([]byte(prefix)), StartRevision: from, PrevKV: true})
	if err != nil {
		t.Fatal(err)
	}
	guard := time.AfterFunc(20*time.Second, func() { w.Close() })
	t.Cleanup(func() { guard.Stop(); w.Close() })
	return w
}

// etcdEvents reads w until it has n events, and returns them with the
// messages they came in.
func etcdEvents(t *testing.T, w *etcdWatch, n int) (events []etcdEvent, msgs []*etcdWatchResponse) {
	t.Helper()
	for len(events) < n {
		r, err := w.next()
		if err != nil {
			t.Fatalf("after %d events: %v", len(events), err)
		}
		if !r.progress() {
			msgs = append(msgs, r)
			events = append(events, r.Events...)
		}
	}
	return events, msgs
}

// etcdEventString is "PUT key=value@rev" or "DELETE key@rev (was value)".
func etcdEventString(e etcdEvent) string {
	if e.Type == "DELETE" {
		was := "?"
		if e.PrevKV != nil {
			was = string(e.PrevKV.Value)
		}
		return fmt.Sprintf("DELETE %s@%d (was %s)", e.KV.Key, e.KV.ModRevision, was)
	}
	return fmt.Sprintf("%s %s=%s@%d", e.Type, e.KV.Key, e.KV.Value, e.KV.ModRevision)
}

// TestEtcdWatch: a prefix's changes in revision order, a txn's together in
// one message at one revision, deletes with the value they removed, and
// the same again when watched from the past.
func TestEtcdWatch(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1).newClient()
	w := etcdWatchOf(t, c, "/w/", 0)
	start := w.header.Revision

	r1 := etcdPutAll(t, c, "/w/a", "1")
	r2 := etcdPutAll(t, c, "/w/b", "1", "/x", "outside")
	multi, err := c.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{
		{Put: &etcdPut{Key: []byte("/w/a"), Value: []byte("2")}},
		{Put: &etcdPut{Key: []byte("/w/c"), Value: []byte("1")}},
		{Delete: &etcdDelete{Key: []byte("/w/b")}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	r3 := multi.Header.Revision
	del, err := c.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{{Delete: &etcdDelete{Key: []byte("/w/"), RangeEnd: []byte("/w0")}}}})
	if err != nil {
		t.Fatal(err)
	}
	r4 := del.Header.Revision

	want := []string{
		fmt.Sprintf(" /w/a=1@%d", r1),
		fmt.Sprintf(" /w/b=1@%d", r2),
		fmt.Sprintf(" /w/a=2@%d", r3),
		fmt.Sprintf(" /w/c=1@%d", r3),
		fmt.Sprintf("DELETE /w/b@%d (was 1)", r3),
		fmt.Sprintf("DELETE /w/a@%d (was 2)", r4),
		fmt.Sprintf("DELETE /w/c@%d (was 1)", r4),
	}
	events, msgs := etcdEvents(t, w, len(want))
	var got []string
	for _, e := range events {
		got = append(got, etcdEventString(e))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(msgs) != 4 || len(msgs[2].Events) != 3 || msgs[2].Header.Revision != r3 {
		t.Errorf("%d messages, the txn's with %d events at %d; want 4, the txn's 3 events in one, at %d", len(msgs), len(msgs[2].Events), msgs[2].Header.Revision, r3)
	}
	if start != r1-1 {
		t.Errorf("created at revision %d; want %d", start, r1-1)
	}

	// From the past: the same history, read back from etcd's.
	again := etcdWatchOf(t, c, "/w/", r1)
	replayed, _ := etcdEvents(t, again, len(want))
	for i, e := range replayed {
		if s := etcdEventString(e); s != want[i] {
			t.Errorf("replayed event %d: %s; want %s", i, s, want[i])
		}
	}
}

// TestEtcdWatchLease: a revoked lease deletes its keys at one revision,
// and each delete's prev_kv names the lease.
func TestEtcdWatchLease(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1).newClient()
	id, ttl, err := c.leaseGrant(etcdCtx(t), 60)
	if err != nil || id == 0 || ttl != 60 {
		t.Fatalf("leaseGrant(60): id %d, ttl %d, %v", id, ttl, err)
	}
	put, err := c.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{
		{Put: &etcdPut{Key: []byte("/l/a"), Value: []byte("1"), Lease: id}},
		{Put: &etcdPut{Key: []byte("/l/b"), Value: []byte("2"), Lease: id}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := c.txn(etcdCtx(t), etcdTxn{Compare: []etcdCompare{{Target: "LEASE", Key: []byte("/l/a"), Lease: id}}}); err != nil || !resp.Succeeded {
		t.Errorf("compare lease: %v, %v; want it to hold", resp, err)
	}
	w := etcdWatchOf(t, c, "/l/", put.Header.Revision+1)
	if err := c.leaseRevoke(etcdCtx(t), id); err != nil {
		t.Fatal(err)
	}
	events, msgs := etcdEvents(t, w, 2)
	if len(msgs) != 1 {
		t.Errorf("%d messages; want the revoke's deletes in one", len(msgs))
	}
	for i, e := range events {
		if e.Type != "DELETE" || e.KV.ModRevision != put.Header.Revision+1 || e.PrevKV == nil || e.PrevKV.Lease != id || string(e.PrevKV.Key) != []string{"/l/a", "/l/b"}[i] {
			t.Errorf("event %d: %s, prev %+v; want the delete of a key of lease %d at %d", i, etcdEventString(e), e.PrevKV, id, put.Header.Revision+1)
		}
	}
	if err := c.leaseRevoke(etcdCtx(t), id); !errors.Is(err, errEtcdLeaseNotFound) {
		t.Errorf("second revoke: %v; want %v", err, errEtcdLeaseNotFound)
	}
}

// TestEtcdWatchCompacted: a watch from a revision etcd compacted away
// ends with the revision its history now starts at.
func TestEtcdWatchCompacted(t *testing.T) {
	t.Parallel()
	cl := startEtcd(t, 1)
	c := cl.newClient()
	r1 := etcdPutAll(t, c, "/k/a", "1")
	etcdPutAll(t, c, "/k/a", "2")
	r3 := etcdPutAll(t, c, "/k/a", "3")
	cl.compact(r3)

	w := etcdWatchOf(t, c, "/k/", r1)
	_, err := w.next()
	var compacted *etcdCompactedError
	if !errors.As(err, &compacted) || compacted.Revision != r3 || !errors.Is(err, errEtcdCompacted) {
		t.Fatalf("watch from %d after a compaction at %d: %v; want *etcdCompactedError at %d", r1, r3, err, r3)
	}
	if _, again := w.next(); again != err {
		t.Errorf("next after the end: %v; want the same error", again)
	}
	// From the compaction on, the history is there.
	events, _ := etcdEvents(t, etcdWatchOf(t, c, "/k/", r3), 1)
	if s := etcdEventString(events[0]); s != fmt.Sprintf(" /k/a=3@%d", r3) {
		t.Errorf("watch from %d: %s", r3, s)
	}
}

// TestEtcdWatchProgress: progress requests, sent on the open request body
// after the create request, are answered with etcd's current revision,
// whether the change that made it was in the watched prefix or not.
func TestEtcdWatchProgress(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1).newClient()
	w := etcdWatchOf(t, c, "/w/", 0)
	for i, key := range []string{"/outside", "/w/inside", "/outside"} {
		rev := etcdPutAll(t, c, key, "v")
		if key == "/w/inside" {
			if events, _ := etcdEvents(t, w, 1); events[0].KV.ModRevision != rev {
				t.Fatalf("event %s; want at %d", etcdEventString(events[0]), rev)
			}
		}
		if err := w.requestProgress(); err != nil {
			t.Fatal(err)
		}
		r, err := w.next()
		if err != nil {
			t.Fatal(err)
		}
		if !r.progress() || r.WatchID != -1 || r.Header.Revision != rev {
			t.Fatalf("progress %d after a put of %s at %d: %+v; want watch -1 at %d", i, key, rev, r, rev)
		}
	}
	w.Close()
	if _, err := w.next(); !errors.Is(err, errWatchClosed) {
		t.Errorf("next after Close: %v; want %v", err, errWatchClosed)
	}
	if err := w.requestProgress(); !errors.Is(err, errWatchClosed) {
		t.Errorf("requestProgress after Close: %v; want %v", err, errWatchClosed)
	}
}

// TestEtcdFailover: when the member a client uses dies, reads, writes and
// a resumed watch go on through the others, none lost or applied twice;
// when it is back the client returns to it. When the leader dies, reads
// go on after the election, and a write caught in it either is applied
// or says its outcome is unknown.
func TestEtcdFailover(t *testing.T) {
	t.Parallel()
	cl := startEtcd(t, 3)
	leader := cl.leader()
	first := (leader + 1) % 3 // a follower: its loss does not stop writes
	c, err := newEtcdClient([]string{cl.members[first].client, cl.members[(first+1)%3].client, cl.members[(first+2)%3].client}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.close)
	c.retryDown = 50 * time.Millisecond
	ids := []uint64{cl.memberID(0), cl.memberID(1), cl.memberID(2)}
	w := etcdWatchOf(t, c, "/f/", 0)
	rev := etcdPutAll(t, c, "/f/a", "1")
	if events, _ := etcdEvents(t, w, 1); events[0].KV.ModRevision != rev || w.header.MemberID != ids[first] {
		t.Fatalf("event %s from member %x; want at %d from member %d", etcdEventString(events[0]), w.header.MemberID, rev, first)
	}

	cl.kill(first)
	if _, err := w.next(); !errors.Is(err, errWatchEnded) {
		t.Errorf("watch on the killed member: %v; want %v", err, errWatchEnded)
	}
	w.Close()
	// Reads go on. (A write sent at the moment the member died could meet
	// a kept-alive connection whose end the client had not yet seen, and
	// end with an unknown outcome: a member dead before the request and
	// one that died handling it look the same from here.)
	read, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/f/a")})
	if err != nil || len(read.KVs) != 1 || read.Header.MemberID == ids[first] {
		t.Fatalf("read with member %d dead: %+v, %v; want an answer from another member", first, read, err)
	}
	// A write whose connection was refused was not sent: it goes to the
	// next member, and is applied once (the version says so).
	cas := func(version int64) etcdTxn {
		return etcdTxn{
			Compare: []etcdCompare{{Target: "VERSION", Key: []byte("/f/a"), Version: version}},
			Success: []etcdOp{{Put: &etcdPut{Key: []byte("/f/a"), Value: []byte("v")}}},
		}
	}
	ok, err := c.txn(etcdCtx(t), cas(1))
	if err != nil || !ok.Succeeded || ok.Header.MemberID == ids[first] {
		t.Fatalf("write with member %d dead: %+v, %v; want it applied by another member", first, ok, err)
	}
	read, err = c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/f/a")})
	if err != nil || len(read.KVs) != 1 || read.KVs[0].Version != 2 || read.Header.MemberID == ids[first] {
		t.Fatalf("read with member %d dead: %+v, %v; want version 2 from another member", first, read, err)
	}
	// The watch resumes elsewhere from the revision after the last seen.
	w = etcdWatchOf(t, c, "/f/", rev+1)
	if events, _ := etcdEvents(t, w, 1); events[0].KV.ModRevision != ok.Header.Revision || w.header.MemberID == ids[first] {
		t.Errorf("resumed watch: %s from member %x; want the write at %d from another member", etcdEventString(events[0]), w.header.MemberID, ok.Header.Revision)
	}

	cl.start(first)
	waitFor(t, "the client back on its first member", func() bool {
		resp, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/f/a")})
		return err == nil && resp.Header.MemberID == ids[first]
	})
	if c.endpoint() != cl.members[first].client {
		t.Errorf("after member %d's return the client prefers %s", first, c.endpoint())
	}

	// etcd answers such a write "request timed out" after its own request
	// timeout, here 6 s: the deadline comes first.
	cl.kill(leader)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, werr := c.txn(ctx, cas(2))
	if werr != nil && !errors.Is(werr, errOutcomeUnknown) {
		t.Fatalf("write while the leader dies: %v; want it applied or %v", werr, errOutcomeUnknown)
	}
	read, err = c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/f/a")})
	if err != nil || len(read.KVs) != 1 || (werr == nil && read.KVs[0].Version != 3) {
		t.Fatalf("read after the leader's death: %+v, %v; want version 3 if the write said so (%v)", read, err, werr)
	}
	t.Logf("the write while the leader died: %v; applied: %v", werr, read.KVs[0].Version == 3)
}

// TestEtcdNoQuorum: with two members of three gone, the third has no
// leader and says so at once (the hasleader metadata): reads and writes
// end unavailable at their deadline, a write provably not applied, not
// of unknown outcome; the watch there ends. With the members back, it
// all works again.
func TestEtcdNoQuorum(t *testing.T) {
	t.Parallel()
	cl := startEtcd(t, 3)
	c := cl.newClient()
	w := etcdWatchOf(t, cl.client(2), "/q/", 0)
	cl.kill(0)
	cl.kill(1)
	waitFor(t, "member 2 without a leader", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := cl.client(2).status(ctx)
		return etcdNotApplied(err) // "no leader"
	})

	put := etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: []byte("/q/a"), Value: []byte("1")}}}}
	for _, tc := range []struct {
		name   string
		c      *etcdClient
		reason func(error) bool
	}{
		{"the member without a leader", cl.client(2), etcdNotApplied},
		{"all members", c, func(error) bool { return true }}, // the last word may be a refused connection
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		_, err := tc.c.txn(ctx, put)
		cancel()
		if !errors.Is(err, errEtcdUnavailable) || errors.Is(err, errOutcomeUnknown) || !tc.reason(err) {
			t.Errorf("write to %s: %v; want %v, not applied", tc.name, err, errEtcdUnavailable)
		}
		ctx, cancel = context.WithTimeout(context.Background(), 500*time.Millisecond)
		_, err = tc.c.rangeKeys(ctx, etcdRange{Key: []byte("/q/a")})
		cancel()
		if !errors.Is(err, errEtcdUnavailable) || !tc.reason(err) {
			t.Errorf("read from %s: %v; want %v", tc.name, err, errEtcdUnavailable)
		}
	}
	_, err := w.next()
	var e *etcdError
	if !errors.As(err, &e) {
		t.Errorf("watch without quorum: %v; want etcd's error", err)
	}
	t.Logf("the watch ended with %v (gRPC code %d, HTTP %d)", err, e.Code, e.Status)

	cl.start(0, 1)
	resp, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/q/a")})
	if err != nil || len(resp.KVs) != 0 {
		t.Errorf("after the quorum's return: %+v, %v; want /q/a never written", resp, err)
	}
}

// TestEtcdHungMember: a member that takes connections and answers
// nothing costs a read one attempt's timeout before the next member
// answers; a write sent to it ends at its deadline with an unknown
// outcome, since it may yet be applied.
func TestEtcdHungMember(t *testing.T) {
	t.Parallel()
	cl := startEtcd(t, 3)
	c := cl.newClient()
	c.tryTimeout = 200 * time.Millisecond
	id0 := cl.memberID(0)
	cl.pause(0)
	defer cl.resume(0)

	resp, err := c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/h/a")})
	if err != nil || resp.Header.MemberID == id0 {
		t.Fatalf("read with member 0 hung: %+v, %v; want an answer from another member", resp, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = cl.client(0).txn(ctx, etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: []byte("/h/a"), Value: []byte("1")}}}})
	if !errors.Is(err, errOutcomeUnknown) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("write to the hung member: %v; want %v", err, errOutcomeUnknown)
	}
}

// TestEtcdTLS: https members that ask for client certificates, with the
// configuration etcdTLSConfig builds from -etcd-ca, -etcd-cert and
// -etcd-key; and its errors, which name the file at fault.
func TestEtcdTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	files := etcdTestCerts(t, dir)
	conf, err := etcdTLSConfig(files["ca"], files["client"], files["client-key"])
	if err != nil {
		t.Fatal(err)
	}
	cl := startEtcdTLS(t, 1, conf, "--cert-file", files["server"], "--key-file", files["server-key"],
		"--trusted-ca-file", files["ca"], "--client-cert-auth")
	c := cl.newClient()
	w := etcdWatchOf(t, c, "/s/", 0)
	rev := etcdPutAll(t, c, "/s/a", "1")
	if events, _ := etcdEvents(t, w, 1); events[0].KV.ModRevision != rev {
		t.Errorf("event over TLS: %s; want at %d", etcdEventString(events[0]), rev)
	}

	// Without a client certificate the member refuses the connection.
	anon, err := etcdTLSConfig(files["ca"], "", "")
	if err != nil {
		t.Fatal(err)
	}
	bare, err := newEtcdClient(cl.endpoints(), anon)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, err := bare.rangeKeys(ctx, etcdRange{Key: []byte("/s/a")}); err == nil {
		t.Error("a client without a certificate was served")
	}

	os.WriteFile(filepath.Join(dir, "empty.pem"), nil, 0o644)
	for _, tc := range []struct{ ca, cert, key, want string }{
		{filepath.Join(dir, "missing.pem"), "", "", "-etcd-ca: open " + filepath.Join(dir, "missing.pem")},
		{filepath.Join(dir, "empty.pem"), "", "", "-etcd-ca " + filepath.Join(dir, "empty.pem") + ": no PEM certificate"},
		{"", files["client"], "", "-etcd-cert and -etcd-key go together"},
		{"", files["client"], files["ca"], "-etcd-cert " + files["client"] + ", -etcd-key " + files["ca"]},
	} {
		if _, err := etcdTLSConfig(tc.ca, tc.cert, tc.key); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("etcdTLSConfig(%q, %q, %q): %v; want %q", tc.ca, tc.cert, tc.key, err, tc.want)
		}
	}
}

// etcdTestCerts writes a CA, a certificate for members at 127.0.0.1 and
// one for clients, both signed by it, with their keys, into dir, and
// returns their files: "ca", "server", "server-key", "client",
// "client-key".
//
// The server's certificate is for client authentication too: with
// --client-cert-auth, etcd 3.4's gateway connects to its own gRPC server
// presenting it.
func etcdTestCerts(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	write := func(name, typ string, der []byte) {
		files[name] = filepath.Join(dir, name+".pem")
		if err := os.WriteFile(files[name], pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newKey := func() *ecdsa.PrivateKey {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}
	caKey := newKey()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "atomkv test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write("ca", "CERTIFICATE", der)
	for i, name := range []string{"server", "client"} {
		key := newKey()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: name},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			NotBefore:   ca.NotBefore, NotAfter: ca.NotAfter,
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if name == "server" {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		write(name, "CERTIFICATE", der)
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		write(name+"-key", "EC PRIVATE KEY", keyDER)
	}
	return files
}

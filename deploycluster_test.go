package main

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The cluster recipe of deploy/cluster, run as written: its Procfile's
// etcd members and AtomKV nodes (the binary deploy/Dockerfile builds),
// behind real Caddy and real nginx configured from its files, with the
// recipe's ports made free ones. Through the balancer: what a client
// does; a node killed (kill -9), the balancer routing around it, and its
// clients resuming on the other node, missing nothing; an etcd member
// stopped, and writes going on.

// clusterFiles are the files of deploy/cluster.
var clusterFiles = []string{"Procfile", "Caddyfile", "nginx.conf"}

// recipeAddr matches an address of one of the recipe's machines
// (127.0.0.11 to 127.0.0.19, loopback addresses of their own) and its
// port.
var recipeAddr = regexp.MustCompile(`\b(127\.0\.0\.1[1-9]):(\d+)\b`)

// caddyHealthPort matches the Caddyfile's health_port.
var caddyHealthPort = regexp.MustCompile(`(?m)^(\s*health_port )(\d+)$`)

// A procLine is a line of a Procfile: a name and a command, which the
// recipe writes as a program and its arguments split at spaces (no
// quotes, no variables), so that every Procfile runner and the test run
// the same thing.
type procLine struct {
	name string
	args []string
}

// A clusterRecipe is deploy/cluster read, and once started, running.
type clusterRecipe struct {
	files   map[string]string // by name: the text, with the test's ports if it runs
	members []procLine        // the Procfile's etcd lines
	nodes   []procLine        // the Procfile's atomkv lines

	etcd  *etcdCluster
	bin   string
	procs []*process // of nodes, nil while killed
}

// readClusterRecipe reads deploy/cluster; with freePorts, every port of
// the recipe's machines is made a free one (the same on each machine).
func readClusterRecipe(t *testing.T, freePorts bool) *clusterRecipe {
	t.Helper()
	r := &clusterRecipe{files: map[string]string{}}
	for _, name := range clusterFiles {
		b, err := os.ReadFile(filepath.Join("deploy", "cluster", name))
		if err != nil {
			t.Fatal(err)
		}
		r.files[name] = string(b)
	}
	if freePorts {
		r.freePorts(t)
	}
	for n, line := range strings.Split(r.files["Procfile"], "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, cmd, ok := strings.Cut(line, ": ")
		if !ok || !regexp.MustCompile(`^[A-Za-z0-9_-]+$`).MatchString(name) {
			t.Fatalf("deploy/cluster/Procfile:%d: %q is not name: command", n+1, line)
		}
		if strings.ContainsAny(cmd, "'\"$`\\|&;<>(){}*?~") {
			t.Fatalf("deploy/cluster/Procfile:%d: %s: a shell would read it otherwise than split at spaces", n+1, name)
		}
		l := procLine{name, strings.Fields(cmd)}
		switch l.args[0] {
		case "etcd":
			r.members = append(r.members, l)
		case "atomkv":
			r.nodes = append(r.nodes, l)
		default:
			t.Fatalf("deploy/cluster/Procfile:%d: %s runs %s; want etcd or atomkv", n+1, name, l.args[0])
		}
	}
	return r
}

// freePorts gives each port of the recipe's machines a port free on all
// of them, the same on each, in every file: a port the machines share
// (such as the admin port Caddy's health_port names) stays shared.
func (r *clusterRecipe) freePorts(t *testing.T) {
	t.Helper()
	hosts, ports := map[string]bool{}, map[string]string{}
	for _, text := range r.files {
		for _, m := range recipeAddr.FindAllStringSubmatch(text, -1) {
			hosts[m[1]] = true
			ports[m[2]] = ""
		}
	}
	taken := map[int]bool{}
	for p := range ports {
		ports[p] = strconv.Itoa(freePortOn(t, slices.Sorted(maps.Keys(hosts)), taken))
	}
	for name, text := range r.files {
		text = recipeAddr.ReplaceAllStringFunc(text, func(addr string) string {
			host, port, _ := strings.Cut(addr, ":")
			return host + ":" + ports[port]
		})
		text = caddyHealthPort.ReplaceAllStringFunc(text, func(line string) string {
			m := caddyHealthPort.FindStringSubmatch(line)
			if ports[m[2]] == "" {
				t.Fatalf("deploy/cluster/%s: health_port %s is no port of the nodes", name, m[2])
			}
			return m[1] + ports[m[2]]
		})
		r.files[name] = text
	}
}

// freePortOn returns a port that was free a moment ago on every one of
// hosts, and not in taken; it adds it to taken.
func freePortOn(t *testing.T, hosts []string, taken map[int]bool) int {
	t.Helper()
	for range 100 {
		ln, err := net.Listen("tcp", net.JoinHostPort(hosts[0], "0"))
		if err != nil {
			t.Fatalf("%v (the recipe's machines are loopback addresses of their own, which Linux routes to lo)", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		free, held := !taken[port], []net.Listener{ln}
		for _, h := range hosts[1:] {
			l, err := net.Listen("tcp", net.JoinHostPort(h, strconv.Itoa(port)))
			if err != nil {
				free = false
				break
			}
			held = append(held, l)
		}
		for _, l := range held {
			l.Close()
		}
		if free {
			taken[port] = true
			return port
		}
	}
	t.Fatalf("no port free on each of %v", hosts)
	return 0
}

// flagValue returns the value of flag name in args ("name value" or
// "name=value"), or "".
func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// hostOf returns the host of a URL or host:port.
func hostOf(t *testing.T, addr string) string {
	t.Helper()
	if u, err := url.Parse(addr); err == nil && u.Host != "" {
		return u.Hostname()
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%q: %v", addr, err)
	}
	return host
}

// TestClusterRecipeFiles checks that the recipe's files agree with each
// other and with the single server's: the etcd members make one cluster
// that compacts its history keeping at least each node's -history; each
// node is started with valid flags, names every member, its own machine's
// first, and has its admin listener where the balancers look for
// /healthz; both balancers list every node; and the cluster's proxy
// configurations keep every setting of deploy/Caddyfile and
// deploy/nginx.conf that streams and WebSockets need. No tool is needed.
func TestClusterRecipeFiles(t *testing.T) {
	r := readClusterRecipe(t, false)
	if len(r.members) < 3 || len(r.members)%2 == 0 {
		t.Errorf("the Procfile runs %d etcd members; want an odd number, at least 3 (a majority survives one lost)", len(r.members))
	}
	if len(r.nodes) < 2 {
		t.Errorf("the Procfile runs %d AtomKV nodes; want at least 2", len(r.nodes))
	}

	var initial, clients []string
	for _, m := range r.members {
		initial = append(initial, flagValue(m.args, "--name")+"="+flagValue(m.args, "--initial-advertise-peer-urls"))
		clients = append(clients, flagValue(m.args, "--advertise-client-urls"))
	}
	histories := map[string]int{}
	var nodeAddrs []string
	adminPorts := map[string]bool{}
	for _, n := range r.nodes {
		cfg, err := parseConfig(n.args[1:], func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Errorf("%s: %v", n.name, err)
			continue
		}
		histories[n.name] = cfg.history
		nodeAddrs = append(nodeAddrs, cfg.addr)
		eps := strings.Split(cfg.etcd, ",")
		if !slices.Equal(slices.Sorted(slices.Values(eps)), slices.Sorted(slices.Values(clients))) {
			t.Errorf("%s: -etcd %s; want every member: %v", n.name, cfg.etcd, clients)
		}
		if hostOf(t, eps[0]) != hostOf(t, cfg.addr) {
			t.Errorf("%s: -etcd starts with %s; want the member on its own machine (%s) first", n.name, eps[0], hostOf(t, cfg.addr))
		}
		admin, port, _ := net.SplitHostPort(cfg.adminAddr)
		if admin != hostOf(t, cfg.addr) {
			t.Errorf("%s: -admin-addr %q; want it on the node's address, %s, where the balancer asks /healthz", n.name, cfg.adminAddr, hostOf(t, cfg.addr))
		}
		adminPorts[port] = true
	}
	if len(adminPorts) != 1 {
		t.Errorf("the nodes' admin ports are %v; want one for all (Caddy's health_port names one)", slices.Sorted(maps.Keys(adminPorts)))
	}
	for _, m := range r.members {
		for _, want := range [][2]string{
			{"--initial-cluster", strings.Join(initial, ",")},
			{"--initial-cluster-state", "new"},
			{"--listen-client-urls", flagValue(m.args, "--advertise-client-urls")},
			{"--listen-peer-urls", flagValue(m.args, "--initial-advertise-peer-urls")},
			{"--auto-compaction-mode", "revision"},
		} {
			if got := flagValue(m.args, want[0]); got != want[1] {
				t.Errorf("%s: %s %q; want %q", m.name, want[0], got, want[1])
			}
		}
		retention, err := strconv.Atoi(flagValue(m.args, "--auto-compaction-retention"))
		for node, history := range histories {
			if err != nil || retention < history {
				t.Errorf("%s: --auto-compaction-retention %q; want at least %s's -history, %d revisions", m.name, flagValue(m.args, "--auto-compaction-retention"), node, history)
			}
		}
	}

	// The balancers: every node, and its /healthz for Caddy.
	caddy := r.files["Caddyfile"]
	m := regexp.MustCompile(`(?m)^\treverse_proxy (.+) \{$`).FindStringSubmatch(caddy)
	if m == nil || !slices.Equal(strings.Fields(m[1]), nodeAddrs) {
		t.Errorf("deploy/cluster/Caddyfile: reverse_proxy %v; want the nodes, %v", m, nodeAddrs)
	}
	if hp := caddyHealthPort.FindStringSubmatch(caddy); hp == nil || !adminPorts[hp[2]] || !strings.Contains(caddy, "\n\t\thealth_uri /healthz\n") {
		t.Errorf("deploy/cluster/Caddyfile: want health_uri /healthz and health_port %v", slices.Collect(maps.Keys(adminPorts)))
	}
	var servers []string
	for _, s := range regexp.MustCompile(`(?m)^    server (\S+) `).FindAllStringSubmatch(r.files["nginx.conf"], -1) {
		servers = append(servers, s[1])
	}
	if !slices.Equal(servers, nodeAddrs) {
		t.Errorf("deploy/cluster/nginx.conf: upstream servers %v; want the nodes, %v", servers, nodeAddrs)
	}

	// What the single server's configurations do for streams and
	// WebSockets, the cluster's do too.
	single, err := os.ReadFile("deploy/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(single), "\t\tflush_interval -1\n") || !strings.Contains(caddy, "\t\tflush_interval -1\n") {
		t.Error("deploy/Caddyfile and deploy/cluster/Caddyfile should both say flush_interval -1")
	}
	single, err = os.ReadFile("deploy/nginx.conf")
	if err != nil {
		t.Fatal(err)
	}
	kept := 0
	for line := range strings.SplitSeq(string(single), "\n") {
		line = strings.TrimSpace(line)
		directive := strings.HasPrefix(line, "proxy_") || strings.HasPrefix(line, "client_max_body_size") ||
			strings.HasPrefix(line, "listen ") || strings.HasPrefix(line, "ssl_certificate") || strings.HasPrefix(line, "map ")
		if !directive || strings.HasPrefix(line, "proxy_pass ") {
			continue
		}
		kept++
		if !strings.Contains(r.files["nginx.conf"], line) {
			t.Errorf("deploy/cluster/nginx.conf lacks %q, which deploy/nginx.conf has", line)
		}
	}
	if kept < 10 {
		t.Errorf("found %d directives of deploy/nginx.conf to look for; the test no longer reads it right", kept)
	}

	// docs/cluster-deploy.md's lines for three machines are the
	// Procfile's, machine 1's address for 127.0.0.11.
	doc, err := os.ReadFile("docs/cluster-deploy.md")
	if err != nil {
		t.Fatal(err)
	}
	onMachines := func(s string) string {
		return regexp.MustCompile(`\b127\.0\.0\.1([1-9])\b`).ReplaceAllString(s, "10.0.0.$1")
	}
	_, block, _ := strings.Cut(string(doc), "# /etc/default/etcd on machine 1")
	block, _, _ = strings.Cut(block, "```")
	got := map[string]string{}
	for _, line := range strings.Split(block, "\n")[1:] {
		if k, v, ok := strings.Cut(line, "="); ok {
			got[k] = v
		}
	}
	want := map[string]string{}
	args := r.members[0].args[1:]
	for i := 0; i+1 < len(args); i += 2 {
		if args[i] != "--data-dir" { // Debian's unit has its own
			want["ETCD_"+strings.ToUpper(strings.ReplaceAll(strings.TrimPrefix(args[i], "--"), "-", "_"))] = onMachines(args[i+1])
		}
	}
	if !maps.Equal(got, want) {
		t.Errorf("docs/cluster-deploy.md's /etc/default/etcd on machine 1:\n%v\nwant the Procfile's %s line, on 10.0.0.1:\n%v", got, r.members[0].name, want)
	}
	wantExec := "ExecStart=/usr/local/bin/" + onMachines(strings.Join(r.nodes[0].args, " "))
	if !strings.Contains(string(doc), "\n"+wantExec+"\n") {
		t.Errorf("docs/cluster-deploy.md lacks %q, the Procfile's %s line on 10.0.0.1", wantExec, r.nodes[0].name)
	}
}

// startClusterRecipe runs the recipe's Procfile on free ports: its etcd
// members (their data in a directory of the test's), then its AtomKV
// nodes. The test's end stops them.
func startClusterRecipe(t *testing.T) *clusterRecipe {
	t.Helper()
	etcdBin := needTool(t, "etcd", "etcd-server")
	r := readClusterRecipe(t, true)
	dir := t.TempDir()
	r.etcd = &etcdCluster{t: t, clients: make([]*etcdClient, len(r.members))}
	for _, l := range r.members {
		args := slices.Clone(l.args)
		args[0] = etcdBin
		for i := range args {
			if i > 0 && args[i-1] == "--data-dir" {
				args[i] = filepath.Join(dir, args[i]) // as run from the recipe's directory
			}
		}
		// Test-only: the members share one disk, and what fsync
		// protects is not what this test looks at.
		args = append(args, "--unsafe-no-fsync")
		r.etcd.members = append(r.etcd.members, &etcdMember{
			name: flagValue(l.args, "--name"), client: flagValue(l.args, "--advertise-client-urls"),
			args: args, log: filepath.Join(dir, l.name+".log"),
		})
	}
	t.Cleanup(r.etcd.stopAll)
	if err := r.etcd.launch(r.etcd.indexes()...); err != nil {
		t.Fatal(err)
	}
	r.bin = buildStatic(t)
	for i := range r.nodes {
		r.procs = append(r.procs, nil)
		r.start(t, i)
	}
	return r
}

// start runs node i's command line, and waits until it serves.
func (r *clusterRecipe) start(t *testing.T, i int) {
	t.Helper()
	r.procs[i] = startBinary(t, r.bin, r.nodes[i].args[1:]...)
}

// kill ends node i with SIGKILL, as a crash would.
func (r *clusterRecipe) kill(t *testing.T, i int) {
	t.Helper()
	r.procs[i].cmd.Process.Kill()
	r.procs[i].cmd.Wait()
	r.procs[i] = nil
	t.Logf("killed %s (kill -9)", r.nodes[i].name)
}

// holder returns the node whose /metrics counts the one open connection
// that metric counts (atomkv_open_streams, atomkv_open_websockets),
// once exactly one is open across the nodes that run.
func (r *clusterRecipe) holder(t *testing.T, metric string) int {
	t.Helper()
	at := -1
	waitFor(t, "one "+metric+" across the nodes", func() bool {
		at = -1
		open := 0.0
		for i, proc := range r.procs {
			if proc == nil {
				continue
			}
			if n := scrape(t, proc.admin)[metric]; n > 0 {
				open += n
				at = i
			}
		}
		return open == 1
	})
	return at
}

// waitBalanced waits until the balancer sends node i, started again,
// requests: it answers one through the balancer. The balancer first
// waits out what it remembers of the node's failure (fail_duration,
// fail_timeout), then checks it.
func (r *clusterRecipe) waitBalanced(t *testing.T, b *balancer, i int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute) // a hang breaker, not a timing assertion
	for scrape(t, r.procs[i].admin)["atomkv_request_duration_seconds_count"] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the balancer sent %s nothing for a minute after it started again", r.nodes[i].name)
		}
		if resp, _ := b.send(t, "GET", "/lost/", ""); resp.code != 200 {
			t.Fatalf("GET /lost/ through the balancer: %d %s", resp.code, resp.body)
		}
		time.Sleep(20 * time.Millisecond) // between polls
	}
	t.Logf("the balancer sends %s requests again", r.nodes[i].name)
}

// TestClusterRecipeCaddy runs the recipe with Caddy in front, configured
// by deploy/cluster/Caddyfile.
//
// It runs in parallel with the other tests, as TestClusterRecipeNginx
// does: the two mostly wait for their balancer to find a node down or up
// again.
func TestClusterRecipeCaddy(t *testing.T) {
	t.Parallel()
	caddy := needTool(t, "caddy", "caddy")
	r := startClusterRecipe(t)
	throughBalancer(t, r, startClusterCaddy(t, caddy, r))
}

// startClusterCaddy runs Caddy in front of the recipe's nodes,
// configured by its Caddyfile (with the test's ports), on HTTPS from
// Caddy's own certificate authority, and waits until it serves. The
// test's end stops it.
func startClusterCaddy(t *testing.T, caddy string, r *clusterRecipe) *balancer {
	t.Helper()
	dir := t.TempDir()
	recipe := filepath.Join(dir, "cluster.Caddyfile")
	os.WriteFile(recipe, []byte(r.files["Caddyfile"]), 0o644)
	cmd, base := caddyCommand(t, caddy, dir, recipe)
	said := runBalancer(t, cmd, "")
	root := filepath.Join(dir, "data", "pki", "authorities", "local", "root.crt")
	var roots *x509.CertPool
	waitFor(t, "Caddy's certificate authority", func() bool {
		pem, err := os.ReadFile(root)
		if err != nil {
			return false
		}
		roots = x509.NewCertPool()
		return roots.AppendCertsFromPEM(pem)
	})
	b := &balancer{proxied: newProxied(base, roots, nil, 0, 0), name: "Caddy"}
	// Caddy's active health check takes a dead node out: it has once the
	// check has found it down twice (the first time, it logs before it
	// marks the node).
	b.takenOut = func(t *testing.T, admin string, after int) {
		t.Helper()
		waitFor(t, "Caddy's health check to find "+admin+" down", func() bool {
			found := 0
			for line := range strings.SplitSeq(said.String()[after:], "\n") {
				if strings.Contains(line, `"msg":"HTTP request failed"`) && strings.Contains(line, `"host":"`+admin+`"`) {
					found++
				}
			}
			return found >= 2
		})
	}
	b.said = said
	b.waitServing(t, "Caddy")
	return b
}

// TestClusterRecipeNginx runs the recipe with nginx in front, configured
// by deploy/cluster/nginx.conf.
func TestClusterRecipeNginx(t *testing.T) {
	t.Parallel()
	nginx := needTool(t, "nginx", "nginx")
	r := startClusterRecipe(t)

	dir := t.TempDir()
	port := freePort(t)
	certFile, keyFile, roots := testCertificate(t, dir)
	// The recipe with the test's ports, and the lines a user edits made
	// this test's, as TestProxyNginx does.
	cmd := nginxCommand(t, nginx, dir, "deploy/cluster/nginx.conf", r.files["nginx.conf"], [][2]string{
		{"    listen 443 ssl http2;\n", fmt.Sprintf("    listen 127.0.0.1:%d ssl http2;\n", port)},
		{"    listen [::]:443 ssl http2;\n", ""},
		{"/etc/letsencrypt/live/kv.example.com/fullchain.pem", certFile},
		{"/etc/letsencrypt/live/kv.example.com/privkey.pem", keyFile},
	})
	// nginx takes a dead node out when a request fails to connect to it,
	// and sends that request on to another node: nothing to wait for.
	b := &balancer{proxied: newProxied(fmt.Sprintf("https://127.0.0.1:%d", port), roots, nil, 0, 0), name: "nginx"}
	b.said = runBalancer(t, cmd, filepath.Join(dir, "error.log"))
	b.waitServing(t, "nginx")
	throughBalancer(t, r, b)

	// nginx did send requests to a dead node (in the first round, the
	// node with no connection left), and every one succeeded: it sent
	// them on.
	logged, _ := os.ReadFile(filepath.Join(dir, "error.log"))
	refused := strings.Count(string(logged), "connect() failed (111: Connection refused) while connecting to upstream")
	if refused == 0 {
		t.Error("nginx never tried a dead node: the test did not see it send a request on")
	}
	t.Logf("nginx found a dead node %d times, and sent each of those requests on", refused)
}

// A balancer is Caddy or nginx in front of the recipe's nodes.
type balancer struct {
	*proxied
	name string
	said *lockedBuffer // its output
	// takenOut, if not nil, waits until the balancer sends nothing to
	// the node whose admin listener is at admin (host:port), killed when
	// the balancer's output was after bytes long.
	takenOut func(t *testing.T, admin string, after int)
}

// runBalancer starts a balancer as runProxy does, and returns its output
// as it comes.
func runBalancer(t *testing.T, cmd *exec.Cmd, logFile string) *lockedBuffer {
	t.Helper()
	said := new(lockedBuffer)
	cmd.Stdout, cmd.Stderr = said, said
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			var logged []byte
			if logFile != "" {
				logged, _ = os.ReadFile(logFile)
			}
			t.Logf("%s said:\n%s%s", filepath.Base(cmd.Path), said.String(), logged)
		}
	})
	return said
}

// lockedBuffer is a process's output, read while it writes.
type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// throughBalancer loses a node, then an etcd member, with clients
// following changes through the balancer; then runs, through it, what
// TestProxyCaddy and TestProxyNginx run through a proxy to one server.
//
// The failures run in the test itself, not in subtests: the processes
// they start again must outlive them. They come first: balancerNodeLost
// finds the node of a client's connection in the nodes' /metrics, which
// count an event stream a client has closed until the node next writes
// to it (its heartbeat); the subtests after it close theirs.
func throughBalancer(t *testing.T, r *clusterRecipe, b *balancer) {
	// Two clients that follow /lost/ through the balancer.
	followers := []*follower{
		{p: b.proxied, kind: "event stream", metric: "atomkv_open_streams", prefix: "/lost/", view: map[string]string{}},
		{p: b.proxied, kind: "WebSocket", metric: "atomkv_open_websockets", prefix: "/lost/", view: map[string]string{}},
	}
	balancerNodeLost(t, r, b, followers)
	balancerMemberLost(t, r, b, followers)
	t.Run("http", func(t *testing.T) { proxyHTTP(t, b.proxied) })
	t.Run("sse", func(t *testing.T) { proxySSE(t, b.proxied) })
	t.Run("websocket", func(t *testing.T) { proxyWebSocket(t, b.proxied) })
}

// balancerNodeLost: an event stream and a WebSocket through the
// balancer, each on its own node (least_conn). Twice, the node of one of
// them is killed: the balancer sends every request after that to the
// other node, and each client the death cut off opens its connection
// again through the balancer from its last resume point (Last-Event-ID,
// since) and gets just what changed meanwhile, with no reset. The node
// is then started again from its Procfile line, and the balancer sends it
// requests again.
func balancerNodeLost(t *testing.T, r *clusterRecipe, b *balancer, followers []*follower) {
	for _, f := range followers {
		f.open(t)
		f.synced(t, nil) // /lost/ is empty
	}
	holders := func() []int {
		var at []int
		for _, f := range followers {
			at = append(at, r.holder(t, f.metric))
		}
		return at
	}
	at := holders()
	if at[0] == at[1] {
		t.Errorf("the event stream and the WebSocket are both on %s; least_conn should have put the second on the other node", r.nodes[at[0]].name)
	}
	write := func(batch map[string]string) {
		t.Helper()
		for _, k := range slices.Sorted(maps.Keys(batch)) {
			if resp, _ := b.send(t, "POST", k, batch[k]); resp.code != 200 {
				t.Fatalf("POST %s through the balancer: %d %s", k, resp.code, resp.body)
			}
		}
	}
	batch := map[string]string{"/lost/start": `"every node up"`}
	write(batch)
	for _, f := range followers {
		f.live(t, batch)
	}

	for round, f := range followers {
		at = holders()
		victim := at[round]
		t.Logf("round %d: the %s is on %s", round+1, f.kind, r.nodes[victim].name)
		after, admin := len(b.said.String()), strings.TrimPrefix(r.procs[victim].admin, "http://")
		r.kill(t, victim)
		if b.takenOut != nil {
			b.takenOut(t, admin, after)
		}
		for i, g := range followers {
			if at[i] == victim {
				g.ended(t)
			}
		}
		missed := map[string]string{}
		for i := range 5 {
			missed[fmt.Sprintf("/lost/%d-%d", round+1, i)] = fmt.Sprintf(`"written while %s was down"`, r.nodes[victim].name)
		}
		write(missed)
		for i, g := range followers {
			if at[i] == victim {
				g.open(t)
				g.synced(t, missed)
			} else {
				g.live(t, missed)
			}
		}
		r.start(t, victim)
		r.waitBalanced(t, b, victim)
	}

	resp, _ := b.send(t, "GET", "/lost/", "")
	var items []struct {
		Key   string
		Value json.RawMessage
	}
	if err := json.Unmarshal([]byte(resp.body), &items); err != nil {
		t.Fatalf("GET /lost/: %d %s", resp.code, resp.body)
	}
	all := map[string]string{}
	for _, it := range items {
		all[it.Key] = string(it.Value)
	}
	for _, f := range followers {
		if !maps.Equal(f.view, all) {
			t.Errorf("the %s holds %v; the cluster %v", f.kind, f.view, all)
		}
	}
}

// balancerMemberLost: the etcd leader stopped, writes go on, through the
// balancer and straight to each node (one of which asked that member
// first, if the leader was etcd1 or etcd2); every node's view stays
// current (its /healthz answers 200, again if it was watching the
// member lost), and the clients following through the balancer get
// every change. The member is then started again from its Procfile line.
func balancerMemberLost(t *testing.T, r *clusterRecipe, b *balancer, followers []*follower) {
	leader := r.etcd.leader()
	r.etcd.stop(leader)
	t.Logf("stopped etcd member %s, the leader", r.etcd.members[leader].name)
	defer r.etcd.start(leader)

	writes := map[string]string{}
	for i := range 5 {
		k := fmt.Sprintf("/lost/member-%d", i)
		writes[k] = `"the leader stopped"`
		if resp, _ := b.send(t, "POST", k, writes[k]); resp.code != 200 {
			t.Fatalf("POST %s through the balancer: %d %s", k, resp.code, resp.body)
		}
	}
	for i, proc := range r.procs {
		k := "/lost/member-" + r.nodes[i].name
		writes[k] = `"straight to the node"`
		if resp := do(t, "POST", proc.url+k, writes[k]); resp.code != 200 {
			t.Fatalf("POST %s to %s: %d %s", k, r.nodes[i].name, resp.code, resp.body)
		}
	}
	for _, f := range followers {
		f.live(t, writes)
	}
	for i, proc := range r.procs {
		waitFor(t, r.nodes[i].name+"'s /healthz to answer 200", func() bool {
			return do(t, "GET", proc.admin+"/healthz", "").code == 200
		})
		for k, v := range writes {
			if resp := do(t, "GET", proc.url+k, ""); resp.code != 200 || resp.body != v {
				t.Errorf("GET %s from %s: %d %s; want %s", k, r.nodes[i].name, resp.code, resp.body, v)
			}
		}
	}
}

// A follower follows a prefix through the balancer over an event stream
// or a WebSocket, and when its connection ends opens another from the
// last resume point it got (Last-Event-ID, since), as client.js does.
type follower struct {
	p      *proxied
	kind   string // "event stream" or "WebSocket"
	metric string // what the node's /metrics counts it in
	prefix string
	view   map[string]string // every key's value, as the changes it got say

	events <-chan followed // of the connection open now
	resume string          // where the connection that ended left off
}

// followed is what a follower's connection brought.
type followed struct {
	name       string // "" for a change; "synced", "reset"; "end" when the connection ended
	key, value string
	at         string // the resume point the connection has reached
}

// open opens the follower's connection through the balancer: from its
// resume point if it has one, else with the initial state.
func (f *follower) open(t *testing.T) {
	t.Helper()
	events := make(chan followed, 1024)
	f.events = events
	if f.kind == "event stream" {
		var headers []string
		if f.resume != "" {
			headers = []string{"Last-Event-ID", f.resume}
		}
		body, stop := f.p.stream(t, f.prefix+"?initial", headers...)
		t.Cleanup(stop)
		go func(from string) {
			last := readEvents(t, body, from, func(ev sseEvent) bool {
				events <- followed{name: ev.name, key: ev.key, value: ev.data, at: ev.id}
				return true
			})
			events <- followed{name: "end", at: last}
		}(f.resume)
		return
	}
	cfg, err := websocket.NewConfig(strings.Replace(f.p.base, "https://", "wss://", 1)+"/", f.p.base)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TlsConfig = f.p.wsTLS()
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("WebSocket through the balancer: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	sub := `{"type":"subscribe","payload":{"key":"` + f.prefix + `","initial":true},"id":1}`
	if f.resume != "" {
		sub = `{"type":"subscribe","payload":{"key":"` + f.prefix + `","since":` + f.resume + `},"id":1}`
	}
	if err := websocket.Message.Send(ws, sub); err != nil {
		t.Fatal(err)
	}
	go func(last string) {
		for {
			var msg string
			if websocket.Message.Receive(ws, &msg) != nil {
				break
			}
			var m struct {
				Type    string
				Payload struct {
					Key   string
					Value json.RawMessage
					Seq   *int64
				}
			}
			if err := json.Unmarshal([]byte(msg), &m); err != nil {
				events <- followed{name: "unexpected " + msg, at: last}
				continue
			}
			if m.Payload.Seq != nil {
				last = strconv.FormatInt(*m.Payload.Seq, 10)
			}
			switch m.Type {
			case "value":
				events <- followed{key: m.Payload.Key, value: string(m.Payload.Value), at: last}
			case "no-value":
				events <- followed{key: m.Payload.Key, value: "null", at: last}
			case "synced", "reset":
				events <- followed{name: m.Type, at: last}
			case "ok": // the subscription's
			default:
				events <- followed{name: "unexpected " + msg, at: last}
			}
		}
		events <- followed{name: "end", at: last}
	}(f.resume)
}

// next returns what the connection brings next.
func (f *follower) next(t *testing.T, waiting string) followed {
	t.Helper()
	select {
	case ev := <-f.events:
		return ev
	case <-time.After(20 * time.Second): // a hang breaker, not a timing assertion
		t.Fatalf("the %s: nothing came while waiting for %s", f.kind, waiting)
		return followed{}
	}
}

// synced reads the state a connection starts with, to synced: it must be
// want, exactly (initial: every key; resumed: what changed since the
// resume point), with no reset before it.
func (f *follower) synced(t *testing.T, want map[string]string) {
	t.Helper()
	got := map[string]string{}
	for {
		ev := f.next(t, "its state and synced")
		switch ev.name {
		case "":
			got[ev.key] = ev.value
			f.view[ev.key] = ev.value
			continue
		case "synced":
		default:
			t.Fatalf("the %s, opened from %q: got %s %s; want its state, then synced", f.kind, f.resume, ev.name, ev.at)
		}
		break
	}
	if len(want) == 0 {
		want = map[string]string{}
	}
	if !maps.Equal(got, want) {
		t.Errorf("the %s, opened from %q: got the state %v; want %v", f.kind, f.resume, got, want)
	}
	t.Logf("the %s, opened from %q, got %d changes, then synced, without a reset", f.kind, f.resume, len(got))
}

// live reads changes until it has got every one of want; none other may
// come.
func (f *follower) live(t *testing.T, want map[string]string) {
	t.Helper()
	pending := maps.Clone(want)
	for len(pending) > 0 {
		ev := f.next(t, fmt.Sprintf("%d changes", len(pending)))
		if ev.name != "" || pending[ev.key] != ev.value {
			t.Fatalf("the %s: got %s %s=%s; want only the changes %v", f.kind, ev.name, ev.key, ev.value, pending)
		}
		delete(pending, ev.key)
		f.view[ev.key] = ev.value
	}
}

// ended waits for the connection to end (its node died), and keeps the
// resume point it reached.
func (f *follower) ended(t *testing.T) {
	t.Helper()
	ev := f.next(t, "the connection to end")
	if ev.name != "end" {
		t.Fatalf("the %s: got %s %s=%s; want the connection to end with its node", f.kind, ev.name, ev.key, ev.value)
	}
	if ev.at == "" {
		t.Fatalf("the %s ended without a resume point", f.kind)
	}
	f.resume = ev.at
	t.Logf("the %s ended with its node, at %s", f.kind, f.resume)
}

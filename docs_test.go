package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"
)

// docFiles are the documentation whose links TestDocsLinks walks.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"README.md"}, files...)
}

// mdLink matches a Markdown link or image: [text](target).
var (
	mdLink     = regexp.MustCompile(`!?\[[^\]]*\]\(([^)\s]+)\)`)
	inlineCode = regexp.MustCompile("`[^`]*`")
)

// markdownLinks returns the link targets of a Markdown text, leaving out
// fenced code blocks and inline code.
func markdownLinks(text string) []string {
	var links []string
	fenced := false
	for line := range strings.SplitSeq(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if fenced || strings.HasPrefix(line, "    ") {
			continue
		}
		line = inlineCode.ReplaceAllString(line, "")
		for _, m := range mdLink.FindAllStringSubmatch(line, -1) {
			links = append(links, m[1])
		}
	}
	return links
}

// headingAnchors returns the anchors GitHub gives the headings of a
// Markdown text: lower case, punctuation dropped, spaces as dashes, a
// repeated one suffixed -1, -2….
func headingAnchors(text string) map[string]bool {
	anchors := map[string]bool{}
	fenced := false
	for line := range strings.SplitSeq(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
		}
		if fenced || !strings.HasPrefix(line, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(title) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
				b.WriteRune(r)
			}
		}
		anchor := b.String()
		for i := 1; anchors[anchor]; i++ {
			anchor = b.String() + "-" + strconv.Itoa(i)
		}
		anchors[anchor] = true
	}
	return anchors
}

// TestDocsLinks walks every link of README.md and docs/: a relative one
// must name a file or directory of the repository, and its #anchor a
// heading of that file. Links to other sites are not fetched.
func TestDocsLinks(t *testing.T) {
	checked := 0
	for _, file := range docFiles(t) {
		text, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, link := range markdownLinks(string(text)) {
			if strings.Contains(link, "://") || strings.HasPrefix(link, "mailto:") {
				continue
			}
			checked++
			target, anchor, _ := strings.Cut(link, "#")
			path := file
			if target != "" {
				path = filepath.Join(filepath.Dir(file), target)
			}
			info, err := os.Stat(path)
			if err != nil {
				t.Errorf("%s: link %q: %v", file, link, err)
				continue
			}
			if anchor == "" {
				continue
			}
			if info.IsDir() || !strings.HasSuffix(path, ".md") {
				t.Errorf("%s: link %q: an anchor into %s, which is not a Markdown file", file, link, path)
				continue
			}
			body, _ := os.ReadFile(path)
			if !headingAnchors(string(body))[anchor] {
				t.Errorf("%s: link %q: %s has no heading #%s", file, link, path, anchor)
			}
		}
	}
	if checked < 10 {
		t.Errorf("checked %d links; the docs link each other more than that", checked)
	}
}

// TestFlagTable: every flag the server defines is a row of README.md's
// flag table. The flags are read from the server's own -h output, so a
// new flag fails this test until it is documented.
func TestFlagTable(t *testing.T) {
	var usage bytes.Buffer
	parseConfig([]string{"-h"}, func(string) string { return "" }, &usage)
	flags := regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(usage.String(), -1)
	if len(flags) < 10 {
		t.Fatalf("found %d flags in the usage text; want them all:\n%s", len(flags), usage.String())
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flags {
		if !bytes.Contains(readme, []byte("\n| `-"+f[1]+"` |")) {
			t.Errorf("flag -%s is not in README.md's flag table", f[1])
		}
	}
}

// A sessionStep is one line of a worked session in the docs: what is
// sent ('>': a WebSocket message, or a curl command), a line received
// ('<'), or what happens meanwhile ('!': a note "(^C; meanwhile: curl …;
// curl …)", which may wrap, its parts separated by ";").
type sessionStep struct {
	kind byte
	text string
	line int
}

// docSessions returns the worked sessions of a Markdown text: the fenced
// blocks whose first line begins with start ("> {" for the WebSocket,
// "> curl" for HTTP), or with a note "(given: curl …; curl …)" that sets
// up the store, followed by such a line.
func docSessions(text, start string) [][]sessionStep {
	var sessions [][]sessionStep
	var cur []sessionStep
	fenced := false
	note, noteLine := "", 0 // a note in progress
	for i, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			if fenced && isSession(cur, start) {
				sessions = append(sessions, cur)
			}
			fenced, cur, note = !fenced, nil, ""
			continue
		}
		if !fenced {
			continue
		}
		switch trimmed := strings.TrimSpace(line); {
		case note != "" || strings.HasPrefix(trimmed, "("):
			if note == "" {
				noteLine = i + 1
			}
			note += " " + trimmed
			if strings.HasSuffix(note, ")") {
				cur = append(cur, sessionStep{'!', strings.TrimSpace(note)[1 : len(strings.TrimSpace(note))-1], noteLine})
				note = ""
			}
		case line == "<":
			cur = append(cur, sessionStep{'<', "", i + 1})
		case strings.HasPrefix(line, "> ") || strings.HasPrefix(line, "< "):
			cur = append(cur, sessionStep{line[0], line[2:], i + 1})
		default:
			cur = append(cur, sessionStep{'?', line, i + 1})
		}
	}
	return sessions
}

// isSession reports whether the steps of a fenced block are a session
// that starts with start, after a "given:" note if any.
func isSession(steps []sessionStep, start string) bool {
	if len(steps) > 0 && steps[0].kind == '!' && strings.HasPrefix(steps[0].text, "given:") {
		steps = steps[1:]
	}
	return len(steps) > 0 && steps[0].kind == start[0] && strings.HasPrefix(steps[0].text, start[2:])
}

// A session compares what the server sends with what a worked session
// shows. Two things differ from run to run: change numbers, which start
// at a random multiple of 2^32, and a TTL, which counts down. So a
// number of 2^32 or more is compared by its distance from the session's
// first such number, and a "ttl" not at all.
type session struct {
	t     *testing.T
	file  string
	first [2]int64 // the first change number received, and shown; 0 until one comes
}

var (
	changeNumber = regexp.MustCompile(`\d{10,}`)
	ttlMember    = regexp.MustCompile(`"ttl":\d+`)
)

// changeNumbers returns the change numbers of a line (2^32 or more), and
// the line with each written "#".
func changeNumbers(line string) ([]int64, string) {
	var seqs []int64
	line = changeNumber.ReplaceAllStringFunc(line, func(n string) string {
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v < 1<<32 {
			return n
		}
		seqs = append(seqs, v)
		return "#"
	})
	return seqs, ttlMember.ReplaceAllString(line, `"ttl":_`)
}

// compare checks a line received against the one the session shows.
func (s *session) compare(at, got, want string) {
	s.t.Helper()
	if !s.alike(got, want) {
		s.t.Fatalf("%s: the server sent\n\t%s\nwhere the session shows\n\t%s", at, got, want)
	}
	gotSeqs, _ := changeNumbers(got)
	wantSeqs, _ := changeNumbers(want)
	for i, g := range gotSeqs {
		if s.first[0] == 0 {
			s.first = [2]int64{g, wantSeqs[i]}
		}
		if g-s.first[0] != wantSeqs[i]-s.first[1] {
			s.t.Fatalf("%s: change %d is the session's first + %d; the session shows first + %d in\n\t%s",
				at, g, g-s.first[0], wantSeqs[i]-s.first[1], want)
		}
	}
}

// alike reports whether a line received is the one the session shows
// but for change numbers and TTLs (see session).
func (s *session) alike(got, want string) bool {
	gotSeqs, gotRest := changeNumbers(got)
	wantSeqs, wantRest := changeNumbers(want)
	return gotRest == wantRest && len(gotSeqs) == len(wantSeqs)
}

// received turns a change number the session shows into this run's.
func (s *session) received(shown string) string {
	if v, err := strconv.ParseInt(shown, 10, 64); err == nil && v >= 1<<32 && s.first[0] != 0 {
		return strconv.FormatInt(v-s.first[1]+s.first[0], 10)
	}
	return shown
}

// docsSessions calls replay for every session of README.md and docs/
// that starts with start, each in a subtest with a server of its own,
// and returns how many there were.
func docsSessions(t *testing.T, start string, replay func(s *session, url string, steps []sessionStep)) int {
	n := 0
	for _, file := range docFiles(t) {
		text, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, steps := range docSessions(string(text), start) {
			n++
			t.Run(fmt.Sprintf("%s:%d", file, steps[0].line), func(t *testing.T) {
				replay(&session{t: t, file: file}, startServer(t), steps)
			})
		}
	}
	return n
}

// TestDocsWebSocketSessions replays every worked WebSocket session of
// README.md and docs/ against a server, and compares each message
// received with the one the session shows (see session).
func TestDocsWebSocketSessions(t *testing.T) {
	n := docsSessions(t, "> {", func(s *session, url string, steps []sessionStep) {
		c := dialWS(s.t, url, "")
		for _, st := range steps {
			at := fmt.Sprintf("%s:%d", s.file, st.line)
			switch st.kind {
			case '>':
				c.send(st.text)
			case '<':
				s.compare(at, c.recvRaw(), st.text)
			case '!':
				s.meanwhile(at, url, st.text, nil)
			default:
				s.t.Fatalf("%s: %q is neither sent (>), received (<) nor a note (…)", at, st.text)
			}
		}
	})
	if n < 2 {
		t.Errorf("replayed %d WebSocket sessions; docs/websocket.md alone shows 2", n)
	}
}

// TestDocsCurlSessions replays every worked curl session of README.md and
// docs/ (an event stream read with curl -N, and plain requests) against a
// server, and compares each line received with the one the session shows
// (see session).
func TestDocsCurlSessions(t *testing.T) {
	n := docsSessions(t, "> curl", func(s *session, url string, steps []sessionStep) {
		var out *bufio.Reader // what the last command prints
		head := false         // out is in the head curl -i prints
		var stream net.Conn
		defer func() {
			if stream != nil {
				stream.Close()
			}
		}()
		for _, st := range steps {
			at := fmt.Sprintf("%s:%d", s.file, st.line)
			switch st.kind {
			case '>':
				c, err := parseCurl(st.text)
				if err != nil {
					s.t.Fatalf("%s: %v", at, err)
				}
				if id, ok := c.headers["Last-Event-ID"]; ok {
					c.headers["Last-Event-ID"] = s.received(id)
				}
				if !c.stream {
					r := c.do(s.t, url)
					out, head = bufio.NewReader(strings.NewReader(c.print(r))), c.head
					continue
				}
				head = false
				stream, out = c.open(s.t, url)
			case '<':
				if out == nil {
					s.t.Fatalf("%s: a line received, but no command runs", at)
				}
				if stream != nil {
					stream.SetReadDeadline(time.Now().Add(10 * time.Second))
				}
				line, err := out.ReadString('\n')
				for head && line != "\n" && !s.alike(strings.TrimSuffix(line, "\n"), st.text) {
					line, err = out.ReadString('\n') // a line of curl -i's head the session leaves out
				}
				if line == "\n" {
					head = false
				}
				if err != nil && line == "" {
					s.t.Fatalf("%s: %v; the session shows %q", at, err, st.text)
				}
				s.compare(at, strings.TrimSuffix(line, "\n"), st.text)
			case '!':
				s.meanwhile(at, url, st.text, func() {
					if stream != nil {
						stream.Close()
					}
					stream, out = nil, nil
				})
			default:
				s.t.Fatalf("%s: %q is neither typed (>), printed (<) nor a note (…)", at, st.text)
			}
		}
	})
	if n < 1 {
		t.Errorf("replayed %d curl sessions; docs/http.md shows one", n)
	}
}

// meanwhile does what a note says happens meanwhile: curl commands (which
// must succeed), and ^C, which interrupt calls.
func (s *session) meanwhile(at, url, note string, interrupt func()) {
	s.t.Helper()
	for part := range strings.SplitSeq(note, ";") {
		part = strings.TrimSpace(part)
		part = strings.TrimSpace(strings.TrimPrefix(strings.TrimPrefix(part, "meanwhile:"), "given:"))
		switch {
		case part == "^C" && interrupt != nil:
			interrupt()
		case strings.HasPrefix(part, "curl "):
			c, err := parseCurl(part)
			if err != nil {
				s.t.Fatalf("%s: %v", at, err)
			}
			if r := c.do(s.t, url); r.code != 200 {
				s.t.Fatalf("%s: %s: %d %s", at, part, r.code, r.body)
			}
		default:
			s.t.Fatalf("%s: %q: want curl commands or ^C", at, part)
		}
	}
}

// A curlCommand is the one form of curl command the sessions show: curl
// [-N] [-s] [-i] [-X METHOD] [-H 'Name: value']... [-d BODY]
// localhost:8000/path. With -i the response's head is printed first, as
// net/http writes it (headers sorted by name); a session may leave out
// any line of the head, but shows those it keeps in order.
type curlCommand struct {
	method, path, body string
	headers            map[string]string
	stream             bool // -N and Accept: text/event-stream
	head               bool // -i
}

// print is what the command prints of a response.
func (c curlCommand) print(r response) string {
	if !c.head {
		return r.body
	}
	var b strings.Builder
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\n", r.code, http.StatusText(r.code))
	names := slices.Sorted(maps.Keys(r.header))
	for _, name := range names {
		for _, v := range r.header[name] {
			fmt.Fprintf(&b, "%s: %s\n", name, v)
		}
	}
	b.WriteString("\n")
	b.WriteString(r.body)
	return b.String()
}

// parseCurl reads a curl command, its words split as a shell would split
// them with single quotes.
func parseCurl(cmd string) (curlCommand, error) {
	var words []string
	for i, part := range strings.Split(cmd, "'") {
		if i%2 == 1 {
			words = append(words, part)
		} else {
			words = append(words, strings.Fields(part)...)
		}
	}
	c := curlCommand{method: "GET", headers: map[string]string{}}
	noBuffer := false
	for i := 1; i < len(words); i++ {
		switch w := words[i]; {
		case w == "-N":
			noBuffer = true
		case w == "-s" || w == "-i" || w == "-si":
			c.head = c.head || strings.Contains(w, "i")
		case (w == "-X" || w == "-H" || w == "-d") && i+1 < len(words):
			i++
			switch w {
			case "-X":
				c.method = words[i]
			case "-H":
				name, value, _ := strings.Cut(words[i], ": ")
				c.headers[name] = value
			case "-d":
				c.body = words[i]
				if c.method == "GET" {
					c.method = "POST" // as curl does
				}
			}
		case strings.HasPrefix(w, "localhost:8000/"):
			c.path = strings.TrimPrefix(w, "localhost:8000")
		default:
			return c, fmt.Errorf("curl: %q is not understood here", w)
		}
	}
	if c.path == "" {
		return c, fmt.Errorf("curl: no localhost:8000/… URL in %q", cmd)
	}
	c.stream = noBuffer && c.headers["Accept"] == "text/event-stream"
	return c, nil
}

// do runs the command as a request to the server at url.
func (c curlCommand) do(t *testing.T, url string) response {
	t.Helper()
	var headers []string
	for name, value := range c.headers {
		headers = append(headers, name, value)
	}
	return do(t, c.method, url+c.path, c.body, headers...)
}

// open starts the command's event stream, and returns its connection and
// a reader of what follows the response's head, as curl -N prints it.
func (c curlCommand) open(t *testing.T, url string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\n", c.path)
	for name, value := range c.headers {
		fmt.Fprintf(conn, "%s: %s\r\n", name, value)
	}
	fmt.Fprintf(conn, "\r\n")
	r := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v", c.path, err)
		}
		if line == "\r\n" {
			return conn, r
		}
	}
}

// TestDocsKeyErrors: every key error the docs quote ("invalid key
// \"/a//b\": empty component", in inline code or in a JSON error body) is
// the error the server gives that key, word for word. A key cut short
// ("/xxx…") is left out.
func TestDocsKeyErrors(t *testing.T) {
	fence := regexp.MustCompile("(?s)```.*?```")
	span := regexp.MustCompile("`[^`]+`")
	checked := 0
	for _, file := range docFiles(t) {
		text, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, code := range span.FindAllString(fence.ReplaceAllString(string(text), ""), -1) {
			msg := strings.Join(strings.Fields(strings.Trim(code, "`")), " ") // a span may wrap
			var body struct{ Error string }
			if json.Unmarshal([]byte(msg), &body) == nil && body.Error != "" {
				msg = body.Error
			}
			i := strings.Index(msg, "invalid key ")
			check := checkKey
			if j := strings.Index(msg, "invalid path "); j >= 0 && (i < 0 || j < i) {
				i, check = j, checkPath
			}
			if i < 0 {
				continue
			}
			msg = msg[i:]
			_, rest, _ := strings.Cut(msg[len("invalid "):], " ") // after "key " or "path "
			quoted, err := strconv.QuotedPrefix(rest)
			if err != nil || strings.Contains(quoted, "…") {
				continue
			}
			key, _ := strconv.Unquote(quoted)
			checked++
			if err := check(key, 4096); err == nil || err.Error() != msg {
				t.Errorf("%s: %s; the server says %v", file, msg, err)
			}
		}
	}
	if checked < 5 {
		t.Errorf("checked %d key errors; the docs quote more", checked)
	}
	t.Logf("%d key errors checked", checked)
}

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
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

package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/alecthomas/kong"
)

func generate(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := writeMan(filepath.Join(dir, "man"), "1.2.3"); err != nil {
		t.Fatal(err)
	}
	if err := writeCompletions(filepath.Join(dir, "completions")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func models(t *testing.T) map[string]*kong.Application {
	t.Helper()
	out := map[string]*kong.Application{}
	for _, c := range commands {
		app, err := c.model()
		if err != nil {
			t.Fatal(err)
		}
		out[c.name] = app
	}
	return out
}

// Two runs write the same bytes: the package build may regenerate them
// at will, and a committed copy would stay current.
func TestReproducible(t *testing.T) {
	a, b := generate(t), generate(t)
	err := filepath.WalkDir(a, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		x, _ := os.ReadFile(p)
		y, err := os.ReadFile(filepath.Join(b, strings.TrimPrefix(p, a)))
		if err != nil || !bytes.Equal(x, y) {
			t.Errorf("%s differs between two runs (%v)", strings.TrimPrefix(p, a), err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Every visible flag and subcommand of the model is in the man page, with
// its environment variable, and man renders the page without a warning.
func TestManPages(t *testing.T) {
	dir := generate(t)
	for _, c := range commands {
		page, err := os.ReadFile(filepath.Join(dir, "man", c.name+"."+c.section))
		if err != nil {
			t.Fatal(err)
		}
		app := models(t)[c.name]
		for _, n := range nodes(app.Node) {
			if n != app.Node && !bytes.Contains(page, []byte(`.SS "`+roff(c.name+" "+path(n))+`"`)) {
				t.Errorf("%s: no section for %q", c.name, path(n))
			}
			for _, f := range visibleFlags(n) {
				if !bytes.Contains(page, []byte(`\fB\-\-`+roff(f.Name)+`\fR`)) {
					t.Errorf("%s: --%s missing", c.name, f.Name)
				}
				for _, e := range f.Tag.Envs {
					if !bytes.Contains(page, []byte(".B "+roff(e)+"\n")) {
						t.Errorf("%s: %s missing", c.name, e)
					}
				}
			}
		}
		if _, err := exec.LookPath("man"); err != nil {
			continue
		}
		cmd := exec.Command("man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", filepath.Join(dir, "man", c.name+"."+c.section))
		cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8", "MANROFFSEQ=", "MANWIDTH=80")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil || stderr.Len() > 0 {
			t.Errorf("man %s: %v\n%s", c.name, err, stderr.String())
		}
	}
}

// bashComplete runs the generated bash completion on words, the last
// being the one under the cursor, and returns the candidates.
func bashComplete(t *testing.T, script string, words ...string) []string {
	t.Helper()
	var quoted []string
	for _, w := range words {
		quoted = append(quoted, "'"+w+"'")
	}
	prog := "source " + script + "\nCOMP_WORDS=(" + strings.Join(quoted, " ") + ")\nCOMP_CWORD=" +
		strconv.Itoa(len(words)-1) + "\n_" + ident(words[0]) + "\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
	out, err := exec.Command("bash", "-c", prog).CombinedOutput()
	if err != nil {
		t.Fatalf("bash: %v\n%s", err, out)
	}
	return strings.Fields(string(out))
}

func TestBashCompletion(t *testing.T) {
	dir := filepath.Join(generate(t), "completions", "bash")
	apps := models(t)
	var modes []string
	for _, f := range apps["aegis-loader"].Node.Children[0].Flags {
		if f.Name == "mode" {
			modes = enumValues(f)
		}
	}
	for _, tc := range []struct {
		words []string
		want  []string
	}{
		{[]string{"aegis-loader", ""}, []string{"load", "unload", "status"}},
		{[]string{"aegis-loader", "load", "--mode", ""}, modes},
		{[]string{"aegis-loader", "load", "--mode", "=", "n"}, []string{"native"}},
		{[]string{"aegisctl", "local", ""}, []string{"sessions", "stats"}},
		{[]string{"aegisctl", "local", "sessions", "--j"}, []string{"--json"}},
		{[]string{"aegis-reaper", "--on"}, []string{"--once"}},
	} {
		got := bashComplete(t, filepath.Join(dir, tc.words[0]), tc.words...)
		for _, w := range tc.want {
			if !slices.Contains(got, w) {
				t.Errorf("%q: %v, want %s among them", tc.words, got, w)
			}
		}
		if len(tc.want) == 0 || len(got) > len(tc.want)+20 {
			t.Errorf("%q: %v", tc.words, got)
		}
	}
	if len(modes) != 3 {
		t.Fatalf("--mode choices %v", modes)
	}
}

// zsh and fish parse the scripts, and fish offers what the model has.
func TestZshFishCompletion(t *testing.T) {
	dir := filepath.Join(generate(t), "completions")
	for _, shell := range []struct{ name, sub, prefix, suffix string }{
		{"zsh", "zsh", "_", ""}, {"fish", "fish", "", ".fish"},
	} {
		if _, err := exec.LookPath(shell.name); err != nil {
			t.Logf("%s not installed: not checked", shell.name)
			continue
		}
		for _, c := range commands {
			if out, err := exec.Command(shell.name, "-n", filepath.Join(dir, shell.sub, shell.prefix+c.name+shell.suffix)).CombinedOutput(); err != nil {
				t.Errorf("%s -n %s: %v\n%s", shell.name, c.name, err, out)
			}
		}
	}
	if _, err := exec.LookPath("fish"); err != nil {
		return
	}
	out, err := exec.Command("fish", "-c", "source "+filepath.Join(dir, "fish", "aegisctl.fish")+"; complete -C 'aegisctl local '").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sessions\t") || !strings.Contains(string(out), "stats\t") || strings.Contains(string(out), "login\t") {
		t.Errorf("fish: aegisctl local: %v\n%s", err, out)
	}
}

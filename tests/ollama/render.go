// Renders an Ollama TEMPLATE with Go's text/template, as Ollama does: the
// template file and a JSON list of messages as arguments, the prompt on stdout.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.Unmarshal([]byte(os.Args[2]), &messages); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(string(text)))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}

// The code editor (CodeMirror 6), loaded only by the page that needs it: it is most of the
// console's bytes, so the functions list does not wait for it.
import { EditorView, basicSetup } from "codemirror";
import { javascript } from "@codemirror/lang-javascript";
import { python } from "@codemirror/lang-python";
import { Compartment } from "@codemirror/state";
import { oneDark } from "@codemirror/theme-one-dark";

const languageOf = (runtime) => (runtime === "nodejs20" ? javascript() : python());

export function createEditor(parent, { text, runtime, label }) {
  const language = new Compartment();
  const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
  const view = new EditorView({
    doc: text,
    extensions: [
      basicSetup,
      language.of(languageOf(runtime)),
      dark ? oneDark : [],
      EditorView.contentAttributes.of({ "aria-label": label }),
    ],
    parent,
  });
  return {
    get text() {
      return view.state.doc.toString();
    },
    reset(newText, newRuntime) {
      view.dispatch({
        changes: { from: 0, to: view.state.doc.length, insert: newText },
        effects: language.reconfigure(languageOf(newRuntime)),
      });
    },
  };
}

// Shows what the pack's nodes report (their "text" UI output: LoRA keys matched, what was loaded and converted,
// where a model was saved) on the node, sized so that the whole text is visible.
//
// While a node runs, the pack sends the text as ComfyUI progress text, which the frontend draws under the node's
// widgets in a box of about two lines (the rest scrolls), and does not remove afterwards. An output node that
// ComfyUI takes from its cache (Save INT8 Model run again unchanged) sends no progress text; ComfyUI only replays
// its UI output in the "executed" message. So this extension shows each "executed" text through the same
// progress-text widget and grows the node until the text fits (up to the box's own maximum height). Cached nodes
// that are not output nodes get no message at all: they keep the text of their last run on this page.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The nodes whose execute() returns ui={"text": [...]} (tests/test_nodes_ui.py checks the list against the pack).
const REPORTING_NODES = new Set([
  "Int8DiffusionModelLoader", "Int8QuantizeModel", "Int8SaveModel",
  "Int8LoraMerge", "Int8LoraMergeStack", "Int8LoraDynamic", "Int8LoraDynamicStack",
]);

function textBox(text) {
  // The scrolling box the frontend renders for a node's progress text, found by its text.
  for (const widget of document.querySelectorAll(".dom-widget")) {
    if (widget.innerText.trim() !== text.trim()) continue;
    for (const el of [widget, ...widget.querySelectorAll("*")]) {
      if (getComputedStyle(el).overflowY === "auto") return el;
    }
  }
  return null;
}

function fit(node, text, tries = 10) {
  // The box exists once the frontend has drawn the new widget; wait for it a few frames.
  const box = textBox(text);
  if (!box) {
    if (tries > 0) requestAnimationFrame(() => fit(node, text, tries - 1));
    return;
  }
  const maxHeight = parseFloat(getComputedStyle(box).maxHeight) || Infinity;
  const missing = Math.min(box.scrollHeight, maxHeight) - box.clientHeight;
  if (missing > 1) {
    node.setSize([node.size[0], node.size[1] + missing / (app.canvas?.ds?.scale || 1)]);
    node.setDirtyCanvas?.(true, true);
  }
}

function show(node, output) {
  const lines = output?.text;
  if (!Array.isArray(lines) || lines.length === 0) return;
  const text = lines.join("\n");
  api.dispatchCustomEvent("progress_text", { nodeId: String(node.id), text });
  requestAnimationFrame(() => fit(node, text));
}

app.registerExtension({
  name: "int8_w8a8.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      show(this, output);
    };
  },
});

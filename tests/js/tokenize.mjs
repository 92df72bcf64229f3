// stdin: {"folder": tokenizer folder, "framing": {...}, "prompts": [...]}  ->  stdout: the port's input_ids per prompt
import { readFileSync } from "node:fs";
import { ClipTokenizer } from "../../convert/web_assets/clip_tokenizer.mjs";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { folder, framing, prompts } = JSON.parse(input);
const tok = new ClipTokenizer(JSON.parse(readFileSync(`${folder}/vocab.json`, "utf8")),
  readFileSync(`${folder}/merges.txt`, "utf8"), framing);
process.stdout.write(JSON.stringify(prompts.map((p) => Array.from(tok.encode(p), Number))));

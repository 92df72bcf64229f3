// stdin: [[shape, "seed"], ...]  ->  stdout: the port's torch.randn for each, as float32 bit patterns
import { torchRandn } from "../../convert/web_assets/torch_randn.mjs";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(([shape, seed]) => Array.from(new Uint32Array(torchRandn(shape, BigInt(seed)).buffer)));
process.stdout.write(JSON.stringify(out));

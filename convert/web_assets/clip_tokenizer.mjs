// CLIP's byte-level BPE tokenizer, as transformers' CLIPTokenizer (tokenizers backend) runs it:
//   special tokens (<|startoftext|>, <|endoftext|>) in the text are kept whole;
//   normalizer: NFC, every run of whitespace -> one space, lowercase (per character);
//   pre-tokenizer: CLIP's pattern ('s|'t|'re|'ve|'m|'ll|'d|letters+|one digit|other non-space+), whitespace dropped;
//   each piece -> UTF-8 bytes -> GPT-2's printable byte characters; the last one gets "</w>";
//   BPE: merge the lowest-ranked adjacent pair until none is in merges.txt; a symbol not in vocab.json is unk;
//   framing: <|startoftext|> + at most (max_length - 2) tokens + <|endoftext|>, padded with the pad token.
// Checked against the Python tokenizer on a prompt list by tests/test_web.py (node).

const PATTERN = /'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/gu;
const WHITESPACE = /\s+/gu;

function bytesToUnicode() {
  const bs = [];
  for (let b = "!".charCodeAt(0); b <= "~".charCodeAt(0); b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  }
  const out = new Array(256);
  bs.forEach((b, i) => { out[b] = String.fromCodePoint(cs[i]); });
  return out;
}

export class ClipTokenizer {
  /**
   * @param {Object<string, number>} vocab  vocab.json
   * @param {string} mergesText             merges.txt
   * @param {{bos_id:number, eos_id:number, pad_id:number, unk_id:number, max_length:number,
   *          specials:Object<string, number>}} framing  from the site's manifest (written by convert)
   */
  constructor(vocab, mergesText, framing) {
    this.vocab = vocab;
    this.ranks = new Map();
    const lines = mergesText.split("\n");
    let rank = 0;
    for (const [i, line] of lines.entries()) {
      if ((i === 0 && line.startsWith("#version")) || line.trim() === "") continue;
      const parts = line.split(" ");
      if (parts.length !== 2) continue;
      this.ranks.set(parts[0] + " " + parts[1], rank++);
    }
    this.framing = framing;
    this.byteChars = bytesToUnicode();
    this.encoder = new TextEncoder();
    this.cache = new Map();
    const specials = Object.keys(framing.specials || {}).sort((a, b) => b.length - a.length);
    this.specialRe = specials.length
      ? new RegExp(specials.map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"), "g") : null;
  }

  bpe(piece) {
    const hit = this.cache.get(piece);
    if (hit) return hit;
    const bytes = this.encoder.encode(piece);
    let word = Array.from(bytes, (b) => this.byteChars[b]);
    word[word.length - 1] += "</w>";
    while (word.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const r = this.ranks.get(word[i] + " " + word[i + 1]);
        if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
      }
      if (best < 0) break;
      const a = word[best], b = word[best + 1];
      const merged = [];
      for (let i = 0; i < word.length;) {
        if (i < word.length - 1 && word[i] === a && word[i + 1] === b) { merged.push(a + b); i += 2; }
        else { merged.push(word[i]); i += 1; }
      }
      word = merged;
    }
    const ids = word.map((s) => (s in this.vocab ? this.vocab[s] : this.framing.unk_id));
    this.cache.set(piece, ids);
    return ids;
  }

  /** Token ids of ``text`` without the framing. */
  encodeText(text) {
    const ids = [];
    const chunks = [];
    if (this.specialRe) {
      let last = 0;
      for (const m of text.matchAll(this.specialRe)) {
        chunks.push([text.slice(last, m.index), null]);
        chunks.push([null, this.framing.specials[m[0]]]);
        last = m.index + m[0].length;
      }
      chunks.push([text.slice(last), null]);
    } else {
      chunks.push([text, null]);
    }
    for (const [chunk, special] of chunks) {
      if (special !== null) { ids.push(special); continue; }
      let t = chunk.normalize("NFC").replace(WHITESPACE, " ");
      t = Array.from(t, (c) => c.toLowerCase()).join("");
      for (const m of t.matchAll(PATTERN)) ids.push(...this.bpe(m[0]));
    }
    return ids;
  }

  /** int64 ids (max_length), framed and padded as SD does: the text encoder's input_ids. */
  encode(text) {
    const { bos_id, eos_id, pad_id, max_length } = this.framing;
    const body = this.encodeText(text).slice(0, max_length - 2);
    const ids = [bos_id, ...body, eos_id];
    while (ids.length < max_length) ids.push(pad_id);
    return BigInt64Array.from(ids.map((i) => BigInt(i)));
  }
}

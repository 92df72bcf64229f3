// torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) in float32, bit for bit.
//
// What torch's CPU kernel does (aten/src/ATen/native/cpu/DistributionTemplates.h, torch 2.x):
// - the generator is mt19937 seeded with the low 32 bits of the seed (Knuth's initialisation);
// - a contiguous float32 tensor of >= 16 elements takes normal_fill: first one uniform per element,
//   (random() & 0xFFFFFF) * 2^-24, then Box-Muller in place, 16 at a time, pairing j with j + 8:
//   radius = sqrt(-2 log(1 - u[j])), theta = 2 pi u[j + 8], out[j] = radius cos, out[j + 8] = radius sin.
//   The log and sincos are avx_mathfun.h's float32 Cephes polynomials (log256_ps, sincos256_ps), not
//   libm, with the multiply-adds the compiler fused into FMAs: both matter to the last bit. When the size
//   is not a multiple of 16, fresh uniforms are drawn for the LAST 16 elements, which are transformed
//   again (they overlap the previous block).
// - fewer than 16 elements: at::normal_distribution<double>, element by element: two 53-bit uniforms
//   from random64() = (first << 32) | second, r = sqrt(-2 log1p(-u2)), theta = 2 pi u1, returns r cos
//   and caches r sin for the next element; each value is then rounded to float32.
// Checked against torch for many seeds and shapes by tests/test_web.py (node) — identical.

const f = Math.fround;

export class MT19937 {
  constructor(seed) {
    // torch keeps the low 32 bits of the (up to 64-bit) seed
    const s = typeof seed === "bigint" ? Number(seed & 0xffffffffn) : Number(BigInt(seed) & 0xffffffffn);
    this.state = new Uint32Array(624);
    this.state[0] = s >>> 0;
    for (let j = 1; j < 624; j++) {
      const prev = this.state[j - 1] ^ (this.state[j - 1] >>> 30);
      this.state[j] = (Math.imul(1812433253, prev) + j) >>> 0;
    }
    this.index = 624;
  }

  twist() {
    const st = this.state;
    for (let k = 0; k < 624; k++) {
      const y = (st[k] & 0x80000000) | (st[(k + 1) % 624] & 0x7fffffff);
      st[k] = (st[(k + 397) % 624] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0)) >>> 0;
    }
    this.index = 0;
  }

  /** One 32-bit draw (torch's random()). */
  next() {
    if (this.index >= 624) this.twist();
    let y = this.state[this.index++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }
}

// float32 bit views
const fbuf = new Float32Array(1);
const ubuf = new Uint32Array(fbuf.buffer);
const ibuf = new Int32Array(fbuf.buffer);
function bitsOf(x) { fbuf[0] = x; return ubuf[0]; }
function fromBits(u) { ubuf[0] = u >>> 0; return fbuf[0]; }

/** float32 fused multiply-add, correctly rounded: a*b is exact in double (24 + 24 bits), the sum is
 *  rounded once to double and then to float; the only double-rounding case (the double sum lands exactly
 *  half-way between two floats with a non-zero remainder) is resolved with the TwoSum remainder. */
export function fmaf(a, b, c) {
  const p = a * b;
  const s = p + c;
  const bb = s - p;
  const err = (p - (s - bb)) + (c - bb);
  const r = f(s);
  if (err === 0 || r === s || !isFinite(s)) return r;
  // is s exactly half-way between r and its neighbour on s's side?
  const ur = bitsOf(r);
  const towardS = (s > r) === (r >= 0) ? 1 : -1; // neighbour in magnitude direction
  const other = fromBits(ur + towardS);
  if (Math.abs(s - r) * 2 !== Math.abs(other - r)) return r;
  // half-way: the exact value lies on err's side of s
  const exactBeyond = (s > r) ? err > 0 : err < 0;
  return exactBeyond ? other : r;
}

const MIN_NORM_POS = fromBits(0x00800000);
const LOG_P = [-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
  2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1].map(f);

/** avx_mathfun's log256_ps for one lane, with the FMAs of torch's build. */
export function cephesLog(x0) {
  let x = Math.max(f(x0), MIN_NORM_POS);
  let imm0 = bitsOf(x) >>> 23;
  x = fromBits((bitsOf(x) & ~0x7f800000) | bitsOf(0.5));
  imm0 -= 0x7f;
  let e = f(imm0);
  e = f(e + 1);
  const mask = x < f(0.707106781186547524);
  const tmp = mask ? x : 0;
  x = f(x - 1);
  if (mask) e = f(e - 1);
  x = f(x + tmp);
  const z = f(x * x);
  let y = f(7.0376836292e-2);
  for (const c of LOG_P) y = fmaf(y, x, c);
  y = f(y * x);
  const eq1 = f(e * f(-2.12194440e-4));
  y = fmaf(y, z, eq1);
  y = fmaf(z, -0.5, y);
  x = f(x + y);
  return fmaf(e, f(0.693359375), x);
}

const FOPI = f(1.27323954473516);
const DP1 = f(-0.78515625), DP2 = f(-2.4187564849853515625e-4), DP3 = f(-3.77489497744594108e-8);
const C0 = f(2.443315711809948e-5), C1 = f(-1.388731625493765e-3), C2 = f(4.166664568298827e-2);
const S0 = f(-1.9515295891e-4), S1 = f(8.3321608736e-3), S2 = f(-1.6666654611e-1);

/** avx_mathfun's sincos256_ps for one lane, with the FMAs of torch's build: [sin, cos]. */
export function cephesSincos(theta) {
  let signSin = bitsOf(theta) & 0x80000000;
  let x = fromBits(bitsOf(theta) & 0x7fffffff);
  const y0 = f(x * FOPI);
  let imm2 = Math.trunc(y0) | 0; // cvttps2dq
  imm2 = (imm2 + 1) & ~1;
  const yq = f(imm2);
  const swapSign = ((imm2 & 4) << 29) >>> 0;
  const poly = (imm2 & 2) === 0;
  signSin = (signSin ^ swapSign) >>> 0;
  const signCos = (((~(imm2 - 2)) & 4) << 29) >>> 0;
  x = fmaf(yq, DP1, x);
  x = fmaf(yq, DP2, x);
  x = fmaf(yq, DP3, x);
  const z = f(x * x);
  let yc = fmaf(C0, z, C1);
  yc = fmaf(yc, z, C2);
  yc = f(yc * z);
  const halfZ = f(z * 0.5);
  yc = fmaf(yc, z, -halfZ);
  yc = f(yc + 1);
  let ys = fmaf(S0, z, S1);
  ys = fmaf(ys, z, S2);
  ys = f(ys * z);
  ys = fmaf(ys, x, x);
  const s = poly ? ys : yc;
  const c = poly ? yc : ys;
  return [fromBits(bitsOf(s) ^ signSin), fromBits(bitsOf(c) ^ signCos)];
}

const TWO_PI = f(2 * Math.PI);
const TWO_POW_M24 = 1 / 16777216;

function fill16(d, o) {
  for (let j = 0; j < 8; j++) {
    const u1 = f(1 - d[o + j]);
    const u2 = d[o + j + 8];
    const radius = f(Math.sqrt(f(-2 * cephesLog(u1))));
    const [s, c] = cephesSincos(f(TWO_PI * u2));
    d[o + j] = f(radius * c);
    d[o + j + 8] = f(radius * s);
  }
}

function uniform53(g) {
  const hi = BigInt(g.next()), lo = BigInt(g.next());
  const v = ((hi << 32n) | lo) & ((1n << 53n) - 1n);
  return Number(v) * 2 ** -53;
}

/** torch.randn(shape) drawn from torch.Generator("cpu").manual_seed(seed), as a Float32Array. */
export function torchRandn(shape, seed) {
  const n = shape.reduce((a, b) => a * b, 1);
  const g = new MT19937(typeof seed === "bigint" ? seed : BigInt(seed));
  const out = new Float32Array(n);
  if (n >= 16) {
    for (let i = 0; i < n; i++) out[i] = (g.next() & 0xffffff) * TWO_POW_M24;
    for (let i = 0; i + 16 <= n; i += 16) fill16(out, i);
    if (n % 16 !== 0) {
      const o = n - 16;
      for (let i = 0; i < 16; i++) out[o + i] = (g.next() & 0xffffff) * TWO_POW_M24;
      fill16(out, o);
    }
    return out;
  }
  let cached = null;
  for (let i = 0; i < n; i++) {
    if (cached !== null) { out[i] = cached; cached = null; continue; }
    const u1 = uniform53(g), u2 = uniform53(g);
    const r = Math.sqrt(-2 * Math.log1p(-u2));
    const theta = 2 * Math.PI * u1;
    cached = r * Math.sin(theta);
    out[i] = r * Math.cos(theta);
  }
  return out;
}

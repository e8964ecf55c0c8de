# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Conv2d by direct convolution, NCHW, and its gradients.

    out[n, k, oh, ow] = b[k] + sum_{c, i, j} W[k, c, i, j] x[n, c, oh*S_h - P_h + i, ow*S_w - P_w + j]

with zero padding P and output size H2 = (H1 - F + 2P)/S + 1 (floor).

Column-vector path (float32, horizontal stride 1, any vertical stride). A tile of KR output channels x RB output rows x one
SIMD vector of output columns lives in vector registers (cdl_simd.h: zmm on
the AVX-512 build, ymm on AVX2, xmm on baseline; tile shapes are chosen per
shape from a table sized for 32 or 16 registers) while the loop runs over
(c, i, j): each step loads RB input row segments, broadcasts KR weights (packed
so they are adjacent) and does KR*RB multiply-adds. Padding is handled inside
the kernel: each thread copies the image a work item reads into a
zero-bordered scratch buffer (its rows cache-line aligned), so the vector loads
need no bounds checks; ragged edges of the last tiles are computed on zeros and
not stored. The input gradient at stride 1 is the same correlation, of
grad_out with the filters flipped and in/out channels swapped. The weight
gradient keeps KR x IB x JB (output channel x kernel row x kernel column)
vectors in registers, sums over images, rows and column vectors, then adds the
lanes in a fixed order.

Channel-vector path (float32, forward and weight gradient): the same sums
as an implicit GEMM with SIMD vectors over OUTPUT CHANNELS K instead of output
columns, for shapes where column vectors waste lanes (LeNet conv2: 10 output
columns fill 10 of 16 lanes) and for horizontal strides > 1, which column
vectors do not handle. Weight gradient: dW^T[(c, i, j), k] = sum_{n, y, x}
Xpad[n, c, y*S_h + i, x*S_w + j] dY[n, k, y, x]; per image grad_out is
transposed to P x Kp (P = H2*W2 positions, K padded to whole vectors) and a
tile of A (c, i) pairs x B adjacent kernel columns x V channel vectors stays in
registers while the loop runs over positions: V loads, A*B broadcasts,
A*B*V multiply-adds (cdl_cvtile.h, one C copy per tile shape). Without padding
the tiles read x itself; otherwise the image is staged as above. grad_bias is
summed from the transposed grad_out (no second pass over grad_out). Forward:
out[n, k, p] = b[k] + sum_{(c, i, j)} Xpad[tap (c, i, j) of p] Wt[(c, i, j), k]
with a tile of A output rows x B adjacent output columns (B = 1, any positions,
at stride > 1) x V channel vectors; results are gathered as P x Kp and
transposed to NCHW. Which path runs depends on the shapes and the build's
vector width only (_use_cv): channel vectors when K >= 12 and they leave at
least as many lanes useful as column vectors (strictly more for the forward
pass, where column vectors win ties); always at horizontal stride > 1.

1x1 convolutions without padding are a GEMM per image (cdl_gemm.h), forward
and input gradient: weight (K x C) times the image's C x positions, strided
positions gathered first. The float32 input gradient at strides > 1 runs phase
by phase: the input cells with y % sh == a and x % sw == b are a stride-1
correlation of grad_out with the taps that reach them (each tap used once),
each computed on the path its shapes pick (channel vectors for narrow phases,
column tiles, a GEMM for one tap) into a buffer of its own, then interleaved
into dx row by row. float64 takes a plain scalar path at strides > 1
(correctness, not speed). On the AVX-512 build the float32 input gradient of
a 3x3 stride-2 kernel (padding 0 or 1, ResNet's downsampling) runs in one pass
instead (cdl_s2dx.h): a register tile holds both column parities of a block
of input rows, and stores them interleaved as whole rows of dx.

Column tiles end in registers (cdl_cvtile.h, cdl_ct_tile): the tiles that read
every kernel row and store whole vectors add the bias (and apply ReLU) to
their accumulators and store them straight to the output, with 3x3 and 5x5
taps compiled as constants. Before, every tile went through a scratch buffer
and a scalar epilogue, which on first layers (C = 1 or 3: 9 to 27 taps per
output) took about a third of the time. The sums run in the same (c, i, j)
order as the buffered tile, so results are bitwise those of before; tiles that
skip padding rows, part-width columns and the 1-channel row-reuse tile keep
the buffered path.

Winograd path (float32, 3x3, stride 1, padding 0-2; auto on the AVX2 and AVX-512
builds from 16 input and 16 output channels, the weight gradient also from 512 2x2
tiles in the batch and where a tile row fills a vector; cdl_wino.h):
F(2x2, 3x3), each 2x2 output tile A^T [(G g G^T) . (B^T d B)] A summed over channels,
16 products per channel pair and tile where the direct sum does 36; on the AVX-512
build outputs of 12 rows or more take F(4x2, 3x3), 4 x 2 tiles with F(4, 3)'s
transforms down the rows (24 products per 8 outputs). The input gradient
is the same forward of grad_out with the flipped filters; the weight gradient is
dU = sum over tiles of (A dy A^T) . (B^T d B), then G^T dU G. Its sums round
differently from the direct path's (within a few float32 ulps of the sum's scale,
about 4x that with F(4x2), some 1e-6 of the scale at 128 channels; the
tests hold it to the NumPy twin as tightly as the direct path), and a NaN or Inf in an
input reaches the whole output tiles of the 4x4 (6x4) patches that hold it, a superset of the
windows that cover it, and mostly as NaN (the transforms subtract Inf from Inf) where
the direct sum gives +-Inf. Work items are blocks of tile rows and (weight gradient) chunks
of blocks fixed by the shapes, so results are bitwise the same for any thread count,
and the forward's also for any batch size. Measured (bench/conv_parts.py) on Zen 2
(AVX2): 0.6-0.93x the direct path's time for ResNet-8's 16-, 32- and 64-channel
layers; on Sapphire Rapids (AVX-512): 0.68-0.91x, the 8x8 weight gradient excepted;
the stem (3 channels) loses (1.4x on Zen 2) and stays direct.

Fused inference (forward only, float32 and float64): relu=True applies ReLU's
rule (v <= 0 gives +0, NaN passes) to each finished value as it is stored, so
the result is bitwise that of the conv followed by relu_forward. pool=True
writes only the 2x2 stride-2 max-pool (floor) of the result: column tiles with
an even number of rows pool their row pairs in registers (the pooling kernels'
rule: a later cell wins if greater or NaN, cells in the order TL, TR, BL, BR);
the channel-vector path (batch >= 8) pools each image's gathered channel
vectors before the transpose; other cases convolve chunks of images into a
~1 MB scratch buffer and pool it. Bitwise the values of the conv followed by
max_pool2d_relu_forward (relu=True) or max_pool2d_forward.

Parallel work is split into fixed items that depend only on the shapes (and
the build's vector width), never on the thread count: forward (image, group of
output channels), input gradient (image, group of input channels), weight
gradient (group of output channels, chunk of images) whose partial sums are
added in chunk order at the end; grad_bias per output channel. Channel-vector
path: forward (image, group of position tiles), weight gradient (chunk of
images, group of pair tiles; at most 8 chunks, summed in chunk order; tile
groups only when chunks are few, e.g. batch 1). No two threads
write the same element, so results are bitwise identical for any thread count.
One split does follow the thread count: on more than one thread, column-path
items with fewer than MIN_ITEMS (image, channel group) pairs are also cut into
row groups. Every row tile is computed alone, so the cut changes no bit.
Items are image-major, and the forward, input-gradient and weight-gradient
loops hand them out statically, in contiguous ranges: each thread takes the
same images in every pass, as the batch-norm, pooling and elementwise passes do,
so a pass reads the images its own core wrote (handed out dynamically, about
half the reads of the pass after a convolution came from the other core's
cache). Which thread runs an item never changes its result. The fallback loops
over channels (_dw_scalar, grad_bias) stay dynamic.
Scratch memory is allocated once per call (per thread: one staged image, plus
for the weight gradient one chunk of grad_out and at most 16 partial weight
gradients; the channel-vector path: one staged image, transposed grad_out or
gathered output of one image, and at most 8 partial weight gradients), outside
the hot loops; no workspace argument is needed. Calls
below ~2^18 multiply-adds run on one thread.
Inputs are trusted: cdl.functional validates them.
"""
import numpy as np
from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from cdl._kernels._openmp cimport omp_get_thread_num

cdef extern from "cdl_simd.h" nogil:
    # Declared as float so that Cython emits plain C arithmetic on it.
    ctypedef float vf "cdl_vf"
    const int VF "CDL_VF"
    const int VREGS "CDL_VREGS"
    vf vload "cdl_vf_load"(const float* p)
    vf vloadr "cdl_vf_loadr"(const float* p)
    void vstore "cdl_vf_store"(float* p, vf v)
    vf vset1 "cdl_vf_set1"(float a)
    float vsum "cdl_vf_sum"(vf v)

from cdl._kernels._gemm cimport GEMM_NR, sgemm, sgemm_scratch

cdef extern from "cdl_cvtile.h" nogil:
    # Register tiles of the channel-vector path, one C copy per shape (A, B, V).
    int cv_rows "cdl_cv_rows"(int v, int b)
    const int CV_VMAX "CDL_CV_VMAX"
    void cv_transpose "cdl_cv_transpose"(const float* src, Py_ssize_t ld_src, Py_ssize_t nr,
                                         Py_ssize_t nc, float* dst, Py_ssize_t ld_dst)
    void cv_wrun "cdl_cv_wrun"(int a, int b, int v, const float* xs, const Py_ssize_t* poff,
                               Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t rstep, Py_ssize_t sw,
                               const float* gt, Py_ssize_t kp, float* am, Py_ssize_t am_a)
    void cv_frun "cdl_cv_frun"(int a, int b, int v, const float* xs, const Py_ssize_t* prow,
                               const Py_ssize_t* roff, Py_ssize_t nr, const float* wt,
                               Py_ssize_t kp, float* tb)
    # Column-path tiles with their epilogue (bias, ReLU, pooling, stores) in
    # registers, row tiles [ty0, ty1) x every column vector of one channel
    # block; returns 0 for a tile shape it does not have.
    int ct_run "cdl_ct_run"(int kr, int rb, int pool, const float* xs, Py_ssize_t xs_c,
                            Py_ssize_t xs_r, Py_ssize_t rstep, Py_ssize_t cin, Py_ssize_t kh,
                            Py_ssize_t kw, const float* wp, const float* bias, int relu,
                            float* dst, Py_ssize_t dst_k, Py_ssize_t dst_r, int nk,
                            Py_ssize_t ohc, Py_ssize_t owc, Py_ssize_t ty0, Py_ssize_t ty1)
    void cv_pool2_plane "cdl_cv_pool2_plane"(const float* y, float* o, Py_ssize_t ow,
                                             Py_ssize_t oh2, Py_ssize_t ow2, Py_ssize_t avail)
    # The pooling rule (v where v > best or NaN, else best) and ReLU's, lanewise.
    vf cv_takes "cdl_cv_takes"(vf best, vf v)
    vf cv_relu "cdl_cv_relu"(vf y)

cdef extern from "cdl_wino.h" nogil:
    # Winograd F(2x2, 3x3) and F(4x2, 3x3): see the header.
    ctypedef struct CdlWino:
        Py_ssize_t N, C, H, W, K, ph, pw, OH, OW, th, npair, nty, kp, tr, per, cp, nch, rowbuf
    const int WINO_AUTO "CDL_WINO_AUTO"
    const int WINO_TALL_AUTO "CDL_WINO_TALL_AUTO"
    const int WINO_KR "CDL_WG_KR"
    void wino_setup "cdl_wino_setup"(CdlWino* g, int nt)
    void wino_filters "cdl_wino_filters"(const float* w, Py_ssize_t K, Py_ssize_t C,
                                         Py_ssize_t kp, int flipped, int th, float* U,
                                         Py_ssize_t k0, Py_ssize_t k1)
    void wino_block "cdl_wino_block"(const CdlWino* g, const float* x, const float* U,
                                     const float* bias, int relu, int acc, float* out,
                                     Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t ka,
                                     Py_ssize_t kb, float* scratch)
    void wino_wsetup "cdl_wino_wsetup"(CdlWino* g)
    void wino_wzero "cdl_wino_wzero"(const CdlWino* g, float* scratch)
    void wino_wchunk "cdl_wino_wchunk"(const CdlWino* g, const float* x, const float* go,
                                       Py_ssize_t ch, float* part, float* scratch)
    void wino_wfinish "cdl_wino_wfinish"(const CdlWino* g, const float* parts,
                                         Py_ssize_t part_size, float* gw, Py_ssize_t k)

cdef extern from "cdl_s2dx.h" nogil:
    # The fused input gradient of 3x3 stride-2 convolutions: see the header.
    ctypedef struct CdlS2dx:
        Py_ssize_t C, H, W, K, OH, OW, ph, pw
    const int S2DX_AUTO "CDL_S2DX_AUTO"
    const int S2DX_KR "CDL_S2DX_KR"
    void s2dx_setup "cdl_s2dx_setup"(CdlS2dx* g)
    Py_ssize_t s2dx_scratch "cdl_s2dx_scratch"(const CdlS2dx* g)
    void s2dx_stage "cdl_s2dx_stage"(const CdlS2dx* g, const float* dy, float* st)
    void s2dx_channels "cdl_s2dx_channels"(const CdlS2dx* g, const float* st,
                                           const float* weight, float* dx_n, Py_ssize_t c0,
                                           Py_ssize_t c1, int acc_out)

# Below this many multiply-adds a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_MACS = 1 << 18
# Work items a correlation is cut into at least (rows split when the batch is small).
cdef Py_ssize_t MIN_ITEMS = 8
# The Winograd path from this many input and output channels on (auto mode).
cdef Py_ssize_t WINO_MIN_CHANNELS = 16
# ... and its weight gradient from this many 2x2 tiles in the batch on (the
# forward's choice must not depend on the batch: a sample's output is the same in
# any batch). The input gradient takes the Winograd path wherever the forward does:
# since the filter transform runs in vectors, reads the flipped filters in place and
# a small batch splits by output channels, it is 0.3-0.9x the direct time at batch 1
# (AVX-512, 1 and 2 threads; 3x3 to 16x16 planes, 16-128 channels).
cdef Py_ssize_t WINO_MIN_GRAD_TILES = 512
# Tiles of 4 output rows (auto mode, where the build takes them) from this many
# output rows on. Their filter transform has 1.5x the cells of 2-row tiles': an 8 x 8
# plane's few tiles do not repay it at batch 1 (64 -> 64 channels: 1.46x the 2-row
# tiles' time; 0.87-0.98x on 16 x 16 and 32 x 32 planes, 0.81-0.91x at batch 64).
cdef Py_ssize_t WINO_TALL_MIN_ROWS = 12
# The filter transform on several threads from this many channel pairs (about 5 us
# of one thread's time).
cdef Py_ssize_t WINO_PARALLEL_FILTER_PAIRS = 1024
# The strided input gradient's GEMM path holds a group of channels' columns (taps x
# output positions) per thread: at most this many floats (64 MB). A 48x48 stride-2
# kernel on a 2048x2048 image needed 8.9 GB for one channel; the phases need none.
cdef Py_ssize_t STRIDED_GEMM_MAX_COLS = 1 << 24
# The fused 3x3 stride-2 input gradient stages one image's grad_out a thread: up to
# this many floats (64 MB).
cdef Py_ssize_t S2DX_MAX_STAGED = 1 << 24


cdef inline int _threads(Py_ssize_t macs, Py_ssize_t items, int num_threads) noexcept nogil:
    if macs < PARALLEL_MIN_MACS or items < 2:
        return 1
    return num_threads


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _imax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


cdef inline Py_ssize_t _align16(Py_ssize_t n) noexcept nogil:
    # Floats rounded up to whole 64-byte cache lines.
    return (n + 15) // 16 * 16


cdef inline float* _aligned(void* mem) noexcept nogil:
    return <float*>((<size_t>mem + 63) & ~(<size_t>63))


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# ----------------------------------------------------------------------------
# float32 vector path
# ----------------------------------------------------------------------------

ctypedef struct Corr:
    # A correlation of `src` (cin x h x w per image) with packed filters, giving
    # cout x oh x ow per image; src is read at (oh*sh + i - offh, ow + j - offw).
    Py_ssize_t n, cin, h, w, cout, kh, kw, oh, ow, sh, offh, offw
    Py_ssize_t kr, rb, kg, rs, qs
    # rg: row tiles per work item (all of them unless the batch is too small to
    # give every thread work by images and channel groups alone).
    Py_ssize_t rg
    # relu: ReLU on the result; pool: dst is the 2x2 stride-2 max-pool (floor)
    # of the result, oh2 x ow2 per plane.
    bint relu, pool
    Py_ssize_t oh2, ow2


cdef inline void _corr_tile(const float* xs, Py_ssize_t xs_c, Py_ssize_t xs_r,
                            const float* wp, Py_ssize_t cin, Py_ssize_t kh, Py_ssize_t kw,
                            Py_ssize_t sh, Py_ssize_t i_lo, Py_ssize_t i_hi, float* tb,
                            const int KR, const int RB) noexcept nogil:
    # KR channels x RB rows x VF columns; the constant KR/RB let the compiler
    # unroll the small loops and keep acc[] in registers. Kernel rows outside
    # [i_lo, i_hi) would read only zero padding rows for every row of the tile.
    cdef vf acc[24]
    cdef vf xv[12]
    cdef Py_ssize_t c, i, j, a, r, rstep = sh * xs_r
    cdef const float* xr
    cdef const float* wq
    for a in range(KR * RB):
        acc[a] = vset1(0)
    for c in range(cin):
        for i in range(i_lo, i_hi):
            xr = xs + c * xs_c + i * xs_r
            wq = wp + (c * kh + i) * kw * KR
            for j in range(kw):
                for r in range(RB):
                    xv[r] = vloadr(xr + r * rstep + j)
                for a in range(KR):
                    for r in range(RB):
                        acc[a * RB + r] = acc[a * RB + r] + wq[a] * xv[r]
                wq = wq + KR
    for a in range(KR * RB):
        vstore(tb + a * VF, acc[a])


cdef inline void _corr_tile_1ch(const float* xs, Py_ssize_t xs_c, Py_ssize_t xs_r,
                                const float* wp, Py_ssize_t cin, Py_ssize_t kw, float* tb,
                                const int RB, const int KH) noexcept nogil:
    # One output channel, stride 1: RB (8) rows x VF columns. With a single channel
    # _corr_tile does one load per multiply-add; here each loaded input row
    # vector feeds the KH output rows that read it (up to KH multiply-adds per
    # load), with the KH taps of the current column held in registers.
    cdef vf acc[8]
    cdef vf wv[5]
    cdef Py_ssize_t c, j, q, i
    cdef const float* xr
    for q in range(RB):
        acc[q] = vset1(0)
    for c in range(cin):
        xr = xs + c * xs_c
        for j in range(kw):
            for i in range(KH):
                wv[i] = vset1(wp[(c * KH + i) * kw + j])
            # Written per (tap row, output row) so that both loops have constant
            # trip counts and unroll; the compiler then merges the loads of the
            # same input row.
            for i in range(KH):
                for q in range(RB):
                    acc[q] = acc[q] + wv[i] * vload(xr + (q + i) * xs_r + j)
    for q in range(RB):
        vstore(tb + q * VF, acc[q])


cdef void _corr_run(Py_ssize_t kr, Py_ssize_t rb, const float* xs, Py_ssize_t xs_c,
                    Py_ssize_t xs_r, const float* wp, Py_ssize_t cin, Py_ssize_t kh,
                    Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t i_lo, Py_ssize_t i_hi,
                    float* tb) noexcept nogil:
    # One call site per tile shape, so the compiler specialises each; the
    # VREGS test is a compile-time constant, so each build keeps only its own.
    if kr == 1 and sh == 1 and (kh == 3 or kh == 5):
        if kh == 5:
            _corr_tile_1ch(xs, xs_c, xs_r, wp, cin, kw, tb, 8, 5)
        else:
            _corr_tile_1ch(xs, xs_c, xs_r, wp, cin, kw, tb, 8, 3)
        return
    if VREGS >= 32:
        if kr == 8:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 8, 3)
        elif kr == 6:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 6, 4)
        elif kr == 4:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 4, 4)
        elif kr == 3:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 3, 6)
        elif kr == 2:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 2, 8)
        else:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 1, 8)
    else:
        if kr == 6:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 6, 2)
        elif kr == 4:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 4, 3)
        elif kr == 3:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 3, 3)
        elif kr == 2:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 2, 4)
        else:
            _corr_tile(xs, xs_c, xs_r, wp, cin, kh, kw, sh, i_lo, i_hi, tb, 1, 6)


cdef void _choose_tile(Py_ssize_t cout, Py_ssize_t oh, Py_ssize_t* kr, Py_ssize_t* rb,
                       bint even=False) noexcept nogil:
    # Fewest channel x row cells computed (padding included), weighted by how
    # fast each tile runs per cell (in 1/16ths, measured on AVX-512): tiles
    # with fewer accumulators or more loads per multiply-add are slower. With
    # 16 vector registers (AVX2, baseline) the tiles are halved so that the
    # accumulators, input rows and a broadcast weight all stay in registers.
    cdef Py_ssize_t cand_kr[6]
    cdef Py_ssize_t cand_rb[6]
    cdef Py_ssize_t cand_cost[6]
    cdef Py_ssize_t t, cells, best = -1, ncand = 6
    if VREGS >= 32:
        cand_kr[0] = 8; cand_rb[0] = 3; cand_cost[0] = 16
        cand_kr[1] = 6; cand_rb[1] = 4; cand_cost[1] = 16
        cand_kr[2] = 4; cand_rb[2] = 4; cand_cost[2] = 18
        cand_kr[3] = 3; cand_rb[3] = 6; cand_cost[3] = 18
        cand_kr[4] = 2; cand_rb[4] = 8; cand_cost[4] = 20
        cand_kr[5] = 1; cand_rb[5] = 8; cand_cost[5] = 32
    else:
        ncand = 5
        cand_kr[0] = 4; cand_rb[0] = 3; cand_cost[0] = 16
        cand_kr[1] = 6; cand_rb[1] = 2; cand_cost[1] = 16
        cand_kr[2] = 3; cand_rb[2] = 3; cand_cost[2] = 18
        cand_kr[3] = 2; cand_rb[3] = 4; cand_cost[3] = 20
        cand_kr[4] = 1; cand_rb[4] = 6; cand_cost[4] = 32
    for t in range(ncand):
        if even and cand_rb[t] % 2:
            continue        # pooling needs whole row pairs in a tile
        cells = _cdiv(cout, cand_kr[t]) * cand_kr[t] * _cdiv(oh, cand_rb[t]) * cand_rb[t]
        cells = cells * cand_cost[t]
        if best < 0 or cells < best:
            best = cells
            kr[0] = cand_kr[t]
            rb[0] = cand_rb[t]


cdef void _copy_inside(const float* src, Py_ssize_t ch, Py_ssize_t h, Py_ssize_t w,
                       Py_ssize_t offh, Py_ssize_t offw, Py_ssize_t rs, Py_ssize_t qs,
                       float* dst) noexcept nogil:
    # The cells of _stage inside src (the zeros around are already there), by whole
    # vectors and a scalar tail: rows are short, and GCC's own vectorised loop
    # spends more on its checks than on the copy.
    cdef Py_ssize_t c, r, q, r_lo, r_hi, q_lo, q_hi, m
    cdef float* d
    cdef const float* sp
    q_lo = _imin(_imax(offw, 0), qs)
    q_hi = _imax(_imin(offw + w, qs), q_lo)
    r_lo = _imin(_imax(offh, 0), rs)
    r_hi = _imax(_imin(offh + h, rs), r_lo)
    m = q_hi - q_lo
    for c in range(ch):
        for r in range(r_lo, r_hi):
            d = dst + (c * rs + r) * qs + q_lo
            sp = src + (c * h + r - offh) * w + q_lo - offw
            q = 0
            while q + VF <= m:
                vstore(d + q, vload(sp + q))
                q = q + VF
            while q < m:
                d[q] = sp[q]
                q = q + 1


cdef void _stage(const float* src, Py_ssize_t ch, Py_ssize_t h, Py_ssize_t w,
                 Py_ssize_t offh, Py_ssize_t offw, Py_ssize_t rs, Py_ssize_t qs,
                 float* dst, bint borders=True) noexcept nogil:
    # dst[c, r, q] = src[c, r - offh, q - offw], zero outside src. borders=False
    # writes only the cells inside src, for a buffer whose zero borders are
    # already in place (staging was up to 80% zeros, and on LeNet's conv2 input
    # gradient it took about half the time).
    if borders:
        memset(dst, 0, ch * rs * qs * sizeof(float))
    _copy_inside(src, ch, h, w, offh, offw, rs, qs, dst)


cdef inline floating _pool4(floating tl, floating tr, floating bl, floating br,
                           bint relu) noexcept nogil:
    # One 2x2 window, the pooling kernels' rule: cells in the order top-left,
    # top-right, bottom-left, bottom-right; a later cell wins if it is greater
    # or NaN. Then ReLU's rule if relu (v <= 0 gives +0, NaN passes).
    cdef floating best = tl
    if tr > best or tr != tr:
        best = tr
    if bl > best or bl != bl:
        best = bl
    if br > best or br != br:
        best = br
    if relu and best <= 0:
        best = 0
    return best


cdef void _corr_item(const Corr* g, const float* src, const float* wpk, const float* bpk,
                     float* dst, Py_ssize_t it, float* xs, float* tb,
                     Py_ssize_t* staged) noexcept nogil:
    # staged: the image this thread's xs holds (-1: none yet, borders not written).
    # bpk: the bias per output channel, zeros past cout (and all zeros without one).
    cdef Py_ssize_t ngroups = _cdiv(g.cout, g.kg)
    cdef Py_ssize_t ohc = 2 * g.oh2 if g.pool else g.oh
    cdef Py_ssize_t nrg = _cdiv(_cdiv(ohc, g.rb), g.rg)
    # items in the order (image, channel group, row group)
    cdef Py_ssize_t n = it // (ngroups * nrg), kgi = it // nrg % ngroups, rgi = it % nrg
    cdef Py_ssize_t k_lo = kgi * g.kg, k_hi = _imin(g.cout, k_lo + g.kg)
    cdef Py_ssize_t ty_lo = rgi * g.rg, ty_hi = _imin(_cdiv(ohc, g.rb), ty_lo + g.rg)
    cdef Py_ssize_t k0, oh0, ow0, a, r, k, nv, q, kb, ty, tx, i_lo, i_hi, nr, owc, dk, dr
    cdef Py_ssize_t ty0, ty1
    cdef Py_ssize_t xs_c = g.rs * g.qs, wsz = g.cin * g.kh * g.kw * g.kr
    cdef const float* wb
    cdef const float* xt
    cdef float* d
    cdef const float* t
    cdef float bk, v
    # _corr_tile_1ch sums in another order (c, j, i): those tiles keep it.
    cdef bint direct = not (g.kr == 1 and g.sh == 1 and (g.kh == 3 or g.kh == 5))
    if staged[0] != n:
        _stage(src + n * g.cin * g.h * g.w, g.cin, g.h, g.w, g.offh, g.offw, g.rs, g.qs, xs,
               staged[0] < 0)
        staged[0] = n
    # Pooled: only the rows and columns the 2x2 windows cover (floor) are computed.
    owc = 2 * g.ow2 if g.pool else g.ow
    # Row tiles that read every kernel row (i_lo == 0, i_hi == kh): a range,
    # [ty0, ty1); with whole column vectors (owc >= VF) they go to the
    # register-epilogue tiles (cdl_cvtile.h), the others to the buffered tile.
    ty0 = 0
    while ty0 < _cdiv(ohc, g.rb) and g.offh > (ty0 * g.rb + g.rb - 1) * g.sh:
        ty0 = ty0 + 1
    ty1 = ty0
    while ty1 < _cdiv(ohc, g.rb) and g.offh + g.h - ty1 * g.rb * g.sh >= g.kh:
        ty1 = ty1 + 1
    if not direct or owc < VF:
        ty1 = ty0
    # This item's row tiles only (each tile is computed alone: any split gives
    # the same bits).
    ty0 = _imin(_imax(ty0, ty_lo), ty_hi)
    ty1 = _imax(_imin(ty1, ty_hi), ty0)
    for kb in range(_cdiv(k_hi - k_lo, g.kr)):
        k0 = k_lo + kb * g.kr
        wb = wpk + (k0 // g.kr) * wsz
        if ty1 > ty0:
            if g.pool:
                d = dst + (n * g.cout + k0) * g.oh2 * g.ow2
                dk, dr = g.oh2 * g.ow2, g.ow2
            else:
                d = dst + (n * g.cout + k0) * g.oh * g.ow
                dk, dr = g.oh * g.ow, g.ow
            if not ct_run(g.kr, g.rb, g.pool, xs, xs_c, g.qs, g.sh * g.qs, g.cin, g.kh, g.kw,
                          wb, bpk + k0, g.relu, d, dk, dr, _imin(g.kr, k_hi - k0), ohc, owc,
                          ty0, ty1):
                ty1 = ty0           # (not reached: every tile shape has its block)
        for ty in range(ty_lo, ty_hi):
            if ty0 <= ty < ty1:
                continue
            oh0 = ty * g.rb
            # Staged rows [offh, offh + h) hold data; the rest are zero padding
            # (with a large kernel and no padding, the input gradient's tiles at
            # the top and bottom would spend up to 60% of their steps on zeros).
            i_lo = _imax(0, g.offh - (oh0 + g.rb - 1) * g.sh)
            i_hi = _imax(i_lo, _imin(g.kh, g.offh + g.h - oh0 * g.sh))
            nr = _imin(g.rb, ohc - oh0)
            for tx in range(_cdiv(owc, VF)):
                ow0 = tx * VF
                if ow0 + VF > owc and owc >= VF:
                    # Last vector overlaps the previous one instead of running
                    # past the row: the overlap is recomputed bit for bit the same,
                    # and every store is a whole vector (pooled: ow0 stays even).
                    ow0 = owc - VF
                xt = xs + oh0 * g.sh * g.qs + ow0
                nv = _imin(VF, owc - ow0)
                _corr_run(g.kr, g.rb, xt, xs_c, g.qs, wb, g.cin, g.kh, g.kw, g.sh,
                          i_lo, i_hi, tb)
                for a in range(g.kr):
                    k = k0 + a
                    if k >= k_hi:
                        break
                    bk = bpk[k]
                    if g.pool:
                        for r in range(0, nr, 2):
                            t = tb + (a * g.rb + r) * VF
                            d = dst + ((n * g.cout + k) * g.oh2 + (oh0 + r) // 2) * g.ow2 + ow0 // 2
                            for q in range(0, nv, 2):
                                d[q // 2] = _pool4(t[q] + bk, t[q + 1] + bk, t[q + VF] + bk,
                                                   t[q + VF + 1] + bk, g.relu)
                        continue
                    for r in range(nr):
                        t = tb + (a * g.rb + r) * VF
                        d = dst + ((n * g.cout + k) * g.oh + oh0 + r) * g.ow + ow0
                        if nv == VF and not g.relu:
                            vstore(d, vload(t) + bk)
                        else:
                            for q in range(nv):
                                v = t[q] + bk
                                if g.relu and v <= 0:
                                    v = 0
                                d[q] = v


cdef int _corr_f32(Corr* g, const float* src, const float* wpk, const float* bpk,
                   float* dst, int num_threads) noexcept nogil:
    # Runs the correlation described by g; wpk holds the filters packed as
    # [cout block][cin][kh][kw][kr], bpk the bias of each output channel (zeros
    # past cout). Returns -1 if scratch memory is missing.
    cdef Py_ssize_t items, it, xs_size, tb_size, tid, per, nty, macs
    cdef int nt
    cdef float* buf
    cdef Py_ssize_t* staged
    cdef void* mem
    # Output channels per work item: large, so that staging the input is paid
    # for once per many channels; smaller for tiny batches so two threads have work.
    g.kg = g.kr * _imax(1, _cdiv(64 if g.n >= 8 else 16, g.kr))
    g.rs = (_cdiv(g.oh, g.rb) * g.rb - 1) * g.sh + g.kh
    # Rows start on cache lines so the j = 0 loads are aligned.
    g.qs = _align16(_cdiv(g.ow, VF) * VF + g.kw - 1)
    items = g.n * _cdiv(g.cout, g.kg)
    macs = g.n * g.cout * g.oh * g.ow * g.cin * g.kh * g.kw
    # Too few items for the threads (one or two images): split the rows as well.
    # Every row tile is computed alone, so the split never changes a bit; one
    # thread keeps whole images.
    nty = _cdiv(2 * g.oh2 if g.pool else g.oh, g.rb)
    g.rg = nty
    if items < MIN_ITEMS and _threads(macs, MIN_ITEMS, num_threads) > 1:
        g.rg = _cdiv(nty, _cdiv(MIN_ITEMS, items))
    items = items * _cdiv(nty, g.rg)
    nt = _threads(macs, items, num_threads)
    xs_size = _align16(g.cin * g.rs * g.qs + VF)
    tb_size = 24 * VF
    per = xs_size + tb_size
    # One cache line per thread for its `staged` marker (no false sharing).
    mem = malloc(nt * per * sizeof(float) + nt * 64 + 64)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    staged = <Py_ssize_t*>(buf + nt * per)
    for tid in range(nt):
        staged[tid * 8] = -1
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        _corr_item(g, src, wpk, bpk, dst, it, buf + tid * per, buf + tid * per + xs_size,
                   staged + tid * 8)
    free(mem)
    return 0


cdef inline void _wgrad_tile(const float* gs, Py_ssize_t gs_k, Py_ssize_t gs_n,
                             const float* xs, Py_ssize_t xs_n, Py_ssize_t xs_r,
                             Py_ssize_t nb, Py_ssize_t oh, Py_ssize_t owp, Py_ssize_t sh,
                             float* res, const int KR, const int IB, const int JB,
                             const int XR) noexcept nogil:
    # res[(a*IB + e)*JB + b] = sum_{n, y, q} gs[a, n, y, q] * xs[n, y*sh + e, q + b]:
    # KR channels x IB kernel rows x JB kernel columns in registers. XR pins the
    # input vector in a register: GCC otherwise re-reads it as a memory operand
    # of each of the KR multiply-adds (measured: 3x1x5 1.45x faster with it, 6x1x3
    # a little slower; AVX2 2x1x5 on Zen 2, LeNet's conv1: 0.76x the time).
    cdef vf acc[24]
    cdef vf gv[12]
    cdef vf xv
    cdef Py_ssize_t n, y, q, a, b, e, qv
    cdef const float* xr
    cdef const float* gr
    for a in range(KR * IB * JB):
        acc[a] = vset1(0)
    for n in range(nb):
        for y in range(oh):
            xr = xs + n * xs_n + y * sh * xs_r
            gr = gs + n * gs_n + y * owp
            for qv in range(owp // VF):
                q = qv * VF
                for a in range(KR):
                    gv[a] = vloadr(gr + a * gs_k + q)
                for e in range(IB):
                    for b in range(JB):
                        if XR:
                            xv = vloadr(xr + e * xs_r + q + b)
                        else:
                            xv = vload(xr + e * xs_r + q + b)
                        for a in range(KR):
                            acc[(a * IB + e) * JB + b] = acc[(a * IB + e) * JB + b] + gv[a] * xv
    for a in range(KR * IB * JB):
        res[a] = vsum(acc[a])


cdef inline void _wgrad_shape(Py_ssize_t ib_left, Py_ssize_t jb_left, Py_ssize_t kg,
                              Py_ssize_t* kr, Py_ssize_t* ib, Py_ssize_t* jb) noexcept nogil:
    # Tile for the next block of kernel offsets: KR*IB*JB accumulators plus KR
    # grad_out vectors and one input vector, all in registers (32 or 16).
    jb[0] = _imin(jb_left, 5)
    ib[0] = 1
    if VREGS < 32:
        if jb[0] == 5:
            kr[0] = 2
        elif jb[0] == 4 or jb[0] == 3:
            kr[0] = 3
            if jb[0] == 3 and ib_left >= 3:
                # Here 1 x 3 x 3 measured faster than 3 x 1 x 3.
                kr[0] = 1
                ib[0] = 3
        elif jb[0] == 2:
            kr[0] = 4
        else:
            kr[0] = 6
        return
    if jb[0] == 5:
        # 3 channels when that splits the group evenly and 4 would not (LeNet's 6).
        kr[0] = 3 if kg % 4 != 0 and kg % 3 == 0 else 4
    elif jb[0] == 4:
        kr[0] = 4
    elif jb[0] == 3:
        # 6 x 1 x 3 beat 2 x 3 x 3 (fewer unaligned input loads per multiply-add).
        kr[0] = 6
    elif jb[0] == 2:
        kr[0] = 8
    else:
        kr[0] = 12


cdef void _wgrad_run(Py_ssize_t kr, Py_ssize_t ib, Py_ssize_t jb, const float* gs, Py_ssize_t gs_k,
                     Py_ssize_t gs_n, const float* xs, Py_ssize_t xs_n, Py_ssize_t xs_r,
                     Py_ssize_t nb, Py_ssize_t oh, Py_ssize_t owp, Py_ssize_t sh,
                     float* res) noexcept nogil:
    # One call site per tile shape chosen by _wgrad_shape (see _corr_run).
    if VREGS >= 32:
        if jb == 5 and kr == 3:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 3, 1, 5, 1)
        elif jb == 5:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 4, 1, 5, 1)
        elif jb == 4:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 4, 1, 4, 0)
        elif jb == 3:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 6, 1, 3, 0)
        elif jb == 2:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 8, 1, 2, 0)
        else:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 12, 1, 1, 0)
    else:
        if jb == 5:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 2, 1, 5, 1)
        elif jb == 4:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 3, 1, 4, 0)
        elif jb == 3 and ib == 3:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 1, 3, 3, 0)
        elif jb == 3:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 3, 1, 3, 0)
        elif jb == 2:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 4, 1, 2, 0)
        else:
            _wgrad_tile(gs, gs_k, gs_n, xs, xs_n, xs_r, nb, oh, owp, sh, res, 6, 1, 1, 0)


ctypedef struct WGrad:
    Py_ssize_t n, c, h, w, k, kh, kw, oh, ow, sh, ph, pw
    Py_ssize_t kg, kgpad, nbk, owp, rs, qs, gs_size, xs_size


cdef void _wgrad_item(const WGrad* g, const float* go, const float* x, float* part,
                      Py_ssize_t it, float* gs, float* xs) noexcept nogil:
    # Partial weight gradient of one (channel group, image chunk) item, written
    # to part[chunk][k][c][i][j].
    cdef Py_ssize_t ngroups = _cdiv(g.k, g.kg)
    cdef Py_ssize_t nci = it // ngroups, kgi = it % ngroups
    cdef Py_ssize_t n_lo = nci * g.nbk, nb = _imin(g.nbk, g.n - n_lo)
    cdef Py_ssize_t k_lo = kgi * g.kg, k_hi = _imin(g.k, k_lo + g.kg)
    cdef Py_ssize_t kgpad = g.kgpad
    cdef Py_ssize_t kl, nl, y, c, i, j0, jb, kr, ib, k0, a, b, e, kb
    cdef Py_ssize_t gs_k = g.nbk * g.oh * g.owp, gs_n = g.oh * g.owp
    cdef Py_ssize_t xs_n = g.rs * g.qs
    cdef float res[24]
    cdef float* d
    cdef float* pc = part + nci * g.k * g.c * g.kh * g.kw
    # grad_out rows padded to whole vectors; channels past k_hi are zero.
    for kl in range(kgpad):
        for nl in range(g.nbk):
            d = gs + kl * gs_k + nl * gs_n
            if k_lo + kl >= k_hi or nl >= nb:
                memset(d, 0, gs_n * sizeof(float))
                continue
            for y in range(g.oh):
                memcpy(d + y * g.owp, go + ((n_lo + nl) * g.k + k_lo + kl) * g.oh * g.ow + y * g.ow,
                       g.ow * sizeof(float))
                if g.owp > g.ow:
                    memset(d + y * g.owp + g.ow, 0, (g.owp - g.ow) * sizeof(float))
    for c in range(g.c):
        for nl in range(nb):
            _stage(x + ((n_lo + nl) * g.c + c) * g.h * g.w, 1, g.h, g.w, g.ph, g.pw,
                   g.rs, g.qs, xs + nl * xs_n)
        j0 = 0
        while j0 < g.kw:
            i = 0
            while i < g.kh:
                _wgrad_shape(g.kh - i, g.kw - j0, g.kg, &kr, &ib, &jb)
                for kb in range(_cdiv(k_hi - k_lo, kr)):
                    k0 = k_lo + kb * kr
                    _wgrad_run(kr, ib, jb, gs + (k0 - k_lo) * gs_k, gs_k, gs_n,
                               xs + i * g.qs + j0, xs_n, g.qs, nb, g.oh, g.owp, g.sh, res)
                    for a in range(kr):
                        if k0 + a >= k_hi:
                            break
                        for e in range(ib):
                            for b in range(jb):
                                pc[(((k0 + a) * g.c + c) * g.kh + i + e) * g.kw + j0 + b] = \
                                    res[(a * ib + e) * jb + b]
                i = i + ib
            j0 = j0 + jb


cdef int _wgrad_f32(WGrad* g, const float* go, const float* x, float* gw,
                    int num_threads) noexcept nogil:
    cdef Py_ssize_t nchunks, items, it, tid, per, wsize, t, ci, i, j0, kr, ib, jb
    cdef int nt
    cdef float* buf
    cdef float* part
    cdef void* mem
    # Chunk size depends only on the shapes: at most 16 partial sums to add at
    # the end, doubled when a chunk has under 128 output rows and its staged
    # grad_out still fits in 192 KB, so that each tile's sum runs long enough
    # to pay for its lane sums and set-up (LeNet's 10x10 outputs).
    g.nbk = _imax(4, _cdiv(g.n, 16))
    if (g.nbk * g.oh < 128 and
            2 * g.nbk * _imin(g.k, 64) * g.oh * _cdiv(g.ow, VF) * VF <= 48 * 1024):
        g.nbk = 2 * g.nbk
    nchunks = _cdiv(g.n, g.nbk)
    g.kg = _imin(g.k, 64 if g.n >= 32 else 16)
    # Channels a tile may read past the group: zeros, staged once per item.
    g.kgpad = g.kg
    j0 = 0
    while j0 < g.kw:
        i = 0
        while i < g.kh:
            _wgrad_shape(g.kh - i, g.kw - j0, g.kg, &kr, &ib, &jb)
            g.kgpad = _imax(g.kgpad, _cdiv(g.kg, kr) * kr)
            i = i + ib
        j0 = j0 + jb
    g.owp = _cdiv(g.ow, VF) * VF
    g.rs = (g.oh - 1) * g.sh + g.kh
    g.qs = _align16(g.owp + g.kw - 1)
    g.gs_size = _align16(g.kgpad * g.nbk * g.oh * g.owp)
    g.xs_size = _align16(g.nbk * g.rs * g.qs + VF)
    items = nchunks * _cdiv(g.k, g.kg)
    wsize = g.k * g.c * g.kh * g.kw
    nt = _threads(g.n * g.k * g.oh * g.ow * g.c * g.kh * g.kw, items, num_threads)
    per = g.gs_size + g.xs_size
    mem = malloc((nt * per + nchunks * wsize) * sizeof(float) + 64)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    part = buf + nt * per
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        _wgrad_item(g, go, x, part, it, buf + tid * per, buf + tid * per + g.gs_size)
    # Partial sums added in chunk order: the same for any thread count.
    memcpy(gw, part, wsize * sizeof(float))
    for ci in range(1, nchunks):
        for t in range(wsize):
            gw[t] = gw[t] + part[ci * wsize + t]
    free(mem)
    return 0


cdef float _sum_f32(const float* p, Py_ssize_t m) noexcept nogil:
    # Fixed-order sum: four vector accumulators, then the tail.
    cdef vf a0 = vset1(0), a1 = vset1(0), a2 = vset1(0), a3 = vset1(0)
    cdef Py_ssize_t q = 0
    cdef float s
    while q + 4 * VF <= m:
        a0 = a0 + vload(p + q)
        a1 = a1 + vload(p + q + VF)
        a2 = a2 + vload(p + q + 2 * VF)
        a3 = a3 + vload(p + q + 3 * VF)
        q = q + 4 * VF
    s = vsum((a0 + a1) + (a2 + a3))
    while q < m:
        s = s + p[q]
        q = q + 1
    return s


# ----------------------------------------------------------------------------
# float32 channel-vector path ("implicit GEMM"): vectors over output channels
# ----------------------------------------------------------------------------

# Test and benchmark hook: 0 picks the path from the shapes, 1 forces the
# column-vector kernels above (stride 1 only), 2 the channel-vector kernels.
cdef int _cv_mode = 0
# Test and benchmark hook for strided input gradients: 0 picks from the shapes, the
# batch size and the build, 1 forces the phases, 2 the GEMM and scatter, 3 the fused
# 3x3 stride-2 pass where the shapes allow it (the phases elsewhere).
cdef int _strided_dx_mode = 0


def set_strided_input_grad_path(int mode):
    """Force the float32 strided input gradient's path (0 auto, 1 phases, 2 GEMM and
    scatter, 3 the fused 3x3 stride-2 pass where it applies); returns the old mode."""
    global _strided_dx_mode
    cdef int old = _strided_dx_mode
    _strided_dx_mode = mode
    return old


# Test and benchmark hook for float32 3x3 stride-1 convolutions: 0 picks from the
# shapes and the build, 1 never takes the Winograd path, 2 takes it wherever the
# shapes allow.
cdef int _wino_mode = 0


def set_winograd_path(int mode):
    """Force the Winograd path of 3x3 stride-1 float32 convolutions (0 auto, 1 off,
    2 wherever the shapes allow); returns the old mode."""
    global _wino_mode
    cdef int old = _wino_mode
    _wino_mode = mode
    return old


cdef int _wino_split_mode = 0
# Output rows a tile of the Winograd forward and both gradients: 0 picks from the
# build and the shapes, 2 is F(2x2, 3x3), 4 F(4x2, 3x3).
cdef int _wino_tile = 0


def set_winograd_tile(int rows):
    """The Winograd path's tile height (0 auto, 2 for F(2x2, 3x3), 4 for F(4x2, 3x3)),
    in the forward and both gradients; returns the old setting."""
    global _wino_tile
    if rows not in (0, 2, 4):
        raise ValueError(f"set_winograd_tile: rows must be 0, 2 or 4, got {rows}")
    cdef int old = _wino_tile
    _wino_tile = rows
    return old



def set_winograd_split(int mode):
    """How the Winograd path splits its work (0 auto, 1 by blocks of tile rows only,
    2 by output channels wherever each thread gets a slice); returns the old mode.
    Speed only: every split gives the same bits."""
    global _wino_split_mode
    cdef int old = _wino_split_mode
    _wino_split_mode = mode
    return old


cdef bint _use_wino(Py_ssize_t C, Py_ssize_t K, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    # From the shapes and the build only (never the batch or the thread count),
    # so a model gives the same bits at any batch size.
    if _wino_mode == 1 or _cv_mode != 0 or C == 0 or K == 0:
        return False
    if KH != 3 or KW != 3 or sh != 1 or sw != 1 or ph < 0 or ph > 2 or pw < 0 or pw > 2:
        return False
    if _wino_mode == 2:
        return True
    return WINO_AUTO and C >= WINO_MIN_CHANNELS and K >= WINO_MIN_CHANNELS


cdef inline Py_ssize_t _wino_rows(Py_ssize_t OH) noexcept nogil:
    # The tile height for OH output rows (set_winograd_tile, else the build and OH).
    if _wino_tile != 0:
        return _wino_tile
    return 4 if WINO_TALL_AUTO and OH >= WINO_TALL_MIN_ROWS else 2


cdef inline void _wino_geometry(CdlWino* g, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H,
                                Py_ssize_t W, Py_ssize_t K, Py_ssize_t ph, Py_ssize_t pw,
                                Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    g.N = N; g.C = C; g.H = H; g.W = W; g.K = K; g.ph = ph; g.pw = pw; g.OH = OH; g.OW = OW


cdef int _wino_f32(const float* x, const float* weight, const float* bias, float* out,
                   Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K,
                   Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t OH, Py_ssize_t OW, bint relu,
                   int num_threads, bint accumulate=False, bint flipped=False) noexcept nogil:
    # Items are blocks of g.tr tile rows of the batch, each for a slice of the output
    # channels; no split changes a bit (each output's sums are its own).
    # accumulate: out += the result; flipped: weight is (C, K, 3, 3), each filter
    # used rotated by 180 degrees (the input gradient). Returns -1 when memory is
    # missing.
    cdef CdlWino g
    cdef Py_ssize_t rows, blocks, items, it, tid, per, s, nkr
    cdef int nt, nf, ns = 1
    cdef float* U
    cdef float* buf
    cdef void* mem
    cdef Py_ssize_t macs = N * K * OH * OW * C * 9
    _wino_geometry(&g, N, C, H, W, K, ph, pw, OH, OW)
    g.th = _wino_rows(OH)
    wino_setup(&g, _threads(macs, 2, num_threads))
    rows = N * g.nty
    blocks = _cdiv(rows, g.tr)
    nkr = g.kp // WINO_KR
    # Few tiles a thread (fewer than two blocks, or at most two tiles per output
    # channel) and a slice of the output channels for each: each thread takes all
    # blocks for its slice, whose filters it transforms itself, and transforms the
    # whole input. Split by blocks, each thread read half the transformed filters
    # from the other core (the 32 -> 64 channel, 16 x 16 layer at batch 1: 64 us on 2
    # threads, 52 us on 1). With more tiles the duplicated input transform costs more
    # (batches 1-16, 16-64 channels, 8x8 to 32x32 planes, 2 threads: 0.54-0.88x
    # the block split's time below that line, 0.9-1.3x above it).
    nt = _threads(macs, blocks * nkr, num_threads)
    if 1 < nt <= nkr and (_wino_split_mode == 2 or (_wino_split_mode == 0 and (
            blocks < 2 * nt or rows * ((OW + 1) // 2) <= 2 * g.kp * nt))):
        ns = nt
        # Each thread takes every block: blocks as long as the setup makes them for
        # one thread (cut for nt threads, a short plane's 4-row tiles filled half a
        # vector: 64 -> 64 channels, 8 x 8, batch 1, 1.6x the 2-row tiles' time).
        wino_setup(&g, 1)
        blocks = _cdiv(rows, g.tr)
        items = blocks * ns
    else:
        items = blocks
        nt = _threads(macs, items, num_threads)
    per = _align16(g.per)
    mem = malloc((_align16(2 * g.npair * C * g.kp) + nt * per) * sizeof(float) + 128)
    if mem == NULL:
        return -1
    U = _aligned(mem)
    buf = U + _align16(2 * g.npair * C * g.kp)
    for it in range(nt):
        memset(buf + it * per, 0, g.rowbuf * sizeof(float))
    if ns > 1:
        # slice s on thread s, in both regions (static schedules, ns threads; the
        # block items come in slice order)
        for s in prange(ns, schedule="static", num_threads=ns):
            wino_filters(weight, K, C, g.kp, flipped, g.th, U, s * nkr // ns * WINO_KR,
                         (s + 1) * nkr // ns * WINO_KR)
    else:
        # The filter transform, split by output channels: one thread takes about
        # 5 ns a channel pair. At least 8 output channels a thread.
        nf = num_threads if C * K >= WINO_PARALLEL_FILTER_PAIRS else 1
        nf = _imax(1, _imin(nf, g.kp // 8))
        for it in prange(nf, schedule="static", num_threads=nf):
            wino_filters(weight, K, C, g.kp, flipped, g.th, U, it * g.kp // nf,
                         (it + 1) * g.kp // nf)
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        s = it // blocks
        wino_block(&g, x, U, bias, relu, accumulate, out, (it % blocks) * g.tr,
                   _imin(rows, (it % blocks + 1) * g.tr), s * nkr // ns * WINO_KR,
                   (s + 1) * nkr // ns * WINO_KR, buf + tid * per)
    free(mem)
    return 0


cdef int _wino_wgrad_f32(const float* go, const float* x, float* gw, Py_ssize_t N,
                         Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K,
                         Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t OH, Py_ssize_t OW,
                         int num_threads) noexcept nogil:
    # The 3x3 stride-1 weight gradient on the Winograd path: chunks (fixed by the
    # shapes) of tile-row blocks, each summed on one thread, then added in chunk
    # order. Returns -1 when memory is missing.
    cdef CdlWino g
    cdef Py_ssize_t it, tid, per, psize, k
    cdef int nt
    cdef float* parts
    cdef float* buf
    cdef void* mem
    _wino_geometry(&g, N, C, H, W, K, ph, pw, OH, OW)
    g.th = _wino_rows(OH)
    wino_wsetup(&g)
    nt = _threads(N * K * OH * OW * C * 9, g.nch, num_threads)
    per = _align16(g.per)
    psize = _align16(2 * g.npair * g.kp * g.cp)
    mem = malloc((g.nch * psize + nt * per) * sizeof(float) + 128)
    if mem == NULL:
        return -1
    parts = _aligned(mem)
    buf = parts + g.nch * psize
    for it in range(nt):
        wino_wzero(&g, buf + it * per)
    for it in prange(g.nch, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        wino_wchunk(&g, x, go, it, parts + it * psize, buf + tid * per)
    for k in prange(K, schedule="static", num_threads=nt):
        wino_wfinish(&g, parts, psize, gw, k)
    free(mem)
    return 0


def set_float32_path(int mode):
    """Force a float32 path (0 auto, 1 column vectors, 2 channel vectors); returns the old mode."""
    global _cv_mode
    cdef int old = _cv_mode
    _cv_mode = mode
    return old


cdef void _cv_shape(Py_ssize_t k, Py_ssize_t* v, Py_ssize_t* kp) noexcept nogil:
    # V: fewest channel vectors computed (K rounded up to a multiple of V
    # vectors), ties to the wider tile.
    cdef Py_ssize_t kv = _cdiv(k, VF), vmax = CV_VMAX
    cdef Py_ssize_t c, best = -1, cells
    for c in range(vmax, 0, -1):
        cells = _cdiv(kv, c) * c
        if best < 0 or cells < best:
            best = cells
            v[0] = c
    kp[0] = best * VF


ctypedef struct CV:
    # Shapes; staged image (C x rs x qs); tile A x B x V with K padded to kp;
    # work split into chunks of nbk images and groups of gsz tiles.
    Py_ssize_t n, c, h, w, k, kh, kw, oh, ow, sh, sw, ph, pw
    Py_ssize_t rs, qs, rows, p, a, b, v, kp, ntiles, nbk, nchunks, ngroups, gsz
    Py_ssize_t xs_size, gt_size, ppad, tx
    bint direct, relu
    # pool: out is the 2x2 stride-2 max-pool (oh2 x ow2) of the result (items of
    # whole images only); bpad: the bias as kp floats (zeros past K or without one).
    bint pool
    Py_ssize_t oh2, ow2
    const float* bpad


cdef void _cv_setup(CV* g) noexcept nogil:
    g.rs = (g.oh - 1) * g.sh + g.kh
    g.qs = (g.ow - 1) * g.sw + g.kw
    g.rows = g.c * g.kh * g.kw
    g.p = g.oh * g.ow
    # Slack past the image: the forward pass's last column tile reads up to
    # B-1 floats beyond a row (those outputs are not stored).
    g.xs_size = _align16(g.c * g.rs * g.qs + 16)
    _cv_shape(g.k, &g.v, &g.kp)


cdef void _cv_wtiles(CV* g) noexcept nogil:
    # Weight-gradient tiles: A (c, i) pairs x up to 5 kernel columns.
    g.a = cv_rows(g.v, _imin(g.kw, 5))
    g.ntiles = _cdiv(g.c * g.kh, g.a)
    g.ppad = g.ntiles * g.a


cdef void _cv_witem(const CV* g, const float* go, const float* x, const Py_ssize_t* poff,
                    float* part, Py_ssize_t psize, bint bias, Py_ssize_t it, float* xs,
                    float* gt, Py_ssize_t* gt_image) noexcept nogil:
    # Item = (chunk of images, group of pair tiles): adds every image of the
    # chunk, in order, into part[chunk][rows of the group][kp]. gt_image: the
    # image whose transposed grad_out this thread's gt holds (-1: none).
    cdef Py_ssize_t ci = it // g.ngroups, gi = it % g.ngroups
    cdef Py_ssize_t n_lo = ci * g.nbk, n_hi = _imin(g.n, n_lo + g.nbk)
    cdef Py_ssize_t t_lo = gi * g.gsz, t_hi = _imin(g.ntiles, t_lo + g.gsz)
    cdef Py_ssize_t n, k, q, t, kb, j0, b, P = g.p, kp = g.kp, vw = g.v * VF
    cdef Py_ssize_t A = g.a, KW = g.kw, c_lo, c_hi
    cdef float* pc = part + ci * psize
    cdef float* pb = pc + g.ppad * KW * kp
    cdef vf a0, a1, a2, a3
    cdef Py_ssize_t nv
    # The first group of each chunk also sums grad_out over positions (grad_bias).
    bias = bias and gi == 0
    if t_lo >= t_hi:
        return
    memset(pc + t_lo * A * KW * kp, 0, (t_hi - t_lo) * A * KW * kp * sizeof(float))
    if bias:
        memset(pb, 0, kp * sizeof(float))
    # Only the channels of this group's pairs are staged.
    c_lo = _imin(t_lo * A // g.kh, g.c - 1)
    c_hi = _imin(g.c, _cdiv(t_hi * A, g.kh))
    for n in range(n_lo, n_hi):
        if g.direct:
            xs = <float*>(x + n * g.c * g.h * g.w)
        else:
            if n == n_lo:
                # Zero border once: every image of the item has the same geometry.
                memset(xs + c_lo * g.rs * g.qs, 0, (c_hi - c_lo) * g.rs * g.qs * sizeof(float))
            _copy_inside(x + (n * g.c + c_lo) * g.h * g.w, c_hi - c_lo, g.h, g.w, g.ph, g.pw,
                         g.rs, g.qs, xs + c_lo * g.rs * g.qs)
        # grad_out[n] (K x P) transposed to P x kp, channels past K zero; once
        # per thread for a batch of one, whose groups all need the same image.
        if gt_image[0] != n:
            cv_transpose(go + n * g.k * P, P, g.k, P, gt, kp)
            if kp > g.k:
                for q in range(P):
                    for k in range(g.k, kp):
                        gt[q * kp + k] = 0
            gt_image[0] = n
        if bias:
            # Up to 4 vectors of channels summed over positions in registers.
            k = 0
            while k < kp:
                nv = _imin(4, (kp - k) // VF)
                a0 = vload(pb + k)
                a1 = vload(pb + k + VF) if nv > 1 else a0
                a2 = vload(pb + k + 2 * VF) if nv > 2 else a0
                a3 = vload(pb + k + 3 * VF) if nv > 3 else a0
                for q in range(P):
                    a0 = a0 + vload(gt + q * kp + k)
                    if nv > 1:
                        a1 = a1 + vload(gt + q * kp + k + VF)
                    if nv > 2:
                        a2 = a2 + vload(gt + q * kp + k + 2 * VF)
                    if nv > 3:
                        a3 = a3 + vload(gt + q * kp + k + 3 * VF)
                vstore(pb + k, a0)
                if nv > 1:
                    vstore(pb + k + VF, a1)
                if nv > 2:
                    vstore(pb + k + 2 * VF, a2)
                if nv > 3:
                    vstore(pb + k + 3 * VF, a3)
                k = k + nv * VF
        for t in range(t_lo, t_hi):
            j0 = 0
            while j0 < KW:
                b = _imin(KW - j0, 5)
                for kb in range(kp // vw):
                    cv_wrun(A, b, g.v, xs + j0, poff + t * A, g.oh, g.ow, g.sh * g.qs, g.sw,
                            gt + kb * vw, kp, pc + (t * A * KW + j0) * kp + kb * vw, KW * kp)
                j0 = j0 + b


cdef int _cv_wgrad(CV* g, const float* go, const float* x, float* gw, float* gb,
                   int num_threads) noexcept nogil:
    cdef Py_ssize_t items, it, tid, per, r, k, ci, c, i, q, psize
    cdef float s
    cdef int nt
    cdef float* buf
    cdef float* part
    cdef Py_ssize_t* poff
    cdef Py_ssize_t* gt_image
    cdef void* mem
    _cv_setup(g)
    # Without padding every tap the tiles read lies inside the image: they
    # read x itself (rows of w floats), nothing is staged.
    g.direct = g.ph == 0 and g.pw == 0
    if g.direct:
        g.rs = g.h
        g.qs = g.w
    _cv_wtiles(g)
    # Work split from the shapes only: at most 8 chunks of images (partial sums
    # added in chunk order), and groups of pair tiles when chunks are few.
    g.nbk = _cdiv(g.n, 8)
    g.nchunks = _cdiv(g.n, g.nbk)
    g.gsz = _cdiv(g.ntiles, _imin(g.ntiles, _cdiv(8, g.nchunks)))
    g.ngroups = _cdiv(g.ntiles, g.gsz)
    g.gt_size = _align16(g.p * g.kp)
    items = g.nchunks * g.ngroups
    nt = _threads(g.n * g.k * g.p * g.rows, items, num_threads)
    per = g.xs_size + g.gt_size
    psize = g.ppad * g.kw * g.kp
    # Per chunk: the partial weight gradient, then kp partial bias sums.
    psize = psize + (_align16(g.kp) if gb != NULL else 0)
    mem = malloc((nt * per + g.nchunks * psize) * sizeof(float) + g.ppad * sizeof(Py_ssize_t)
                 + nt * 64 + 128)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    part = buf + nt * per
    poff = <Py_ssize_t*>(part + g.nchunks * psize)
    # One cache line per thread for its gt_image marker (no false sharing).
    gt_image = poff + g.ppad + 8 - g.ppad % 8
    for tid in range(nt):
        gt_image[tid * 8] = -1
    # poff[(c, i)]: kernel row i of channel c for output position 0. Padding
    # pairs repeat the last real one (staged by the same item, so they read
    # real numbers); their sums are never stored.
    for q in range(g.ppad):
        c = _imin(q, g.c * g.kh - 1) // g.kh
        i = _imin(q, g.c * g.kh - 1) % g.kh
        poff[q] = (c * g.rs + i) * g.qs
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        _cv_witem(g, go, x, poff, part, psize, gb != NULL, it, buf + tid * per,
                  buf + tid * per + g.xs_size, gt_image + tid * 8)
    # Chunks added in order (the same for any thread count); rows r = (c, i, j)
    # transposed back to (K, C, KH, KW).
    for ci in range(1, g.nchunks):
        for r in range(g.rows * g.kp):
            part[r] = part[r] + part[ci * psize + r]
        if gb != NULL:
            for r in range(g.ppad * g.kw * g.kp, g.ppad * g.kw * g.kp + g.k):
                part[r] = part[r] + part[ci * psize + r]
    cv_transpose(part, g.kp, g.rows, g.k, gw, g.rows)
    if gb != NULL:
        for k in range(g.k):
            gb[k] = part[g.ppad * g.kw * g.kp + k]
    free(mem)
    return 0


cdef void _cv_ftiles(CV* g) noexcept nogil:
    # Forward tiles. Stride 1: A x B with the fewest output cells computed
    # (padding included); otherwise A positions in row-major order (B = 1).
    cdef Py_ssize_t a, b, cells, best = -1
    if g.sw == 1:
        for b in range(5, 0, -1):
            a = cv_rows(g.v, b)
            cells = _cdiv(g.oh, a) * a * _cdiv(g.ow, b) * b
            if best < 0 or cells < best:
                best = cells
                g.a = a
                g.b = b
        g.tx = _cdiv(g.ow, g.b)
        g.ntiles = _cdiv(g.oh, g.a) * g.tx
    else:
        g.b = 1
        g.a = cv_rows(g.v, 1)
        g.tx = 1
        g.ntiles = _cdiv(g.p, g.a)


cdef inline void _add_scalar(float* d, Py_ssize_t m, float b) noexcept nogil:
    # d[q] = d[q] + b, by vectors and a scalar tail (the same sums either way).
    cdef Py_ssize_t q = 0
    while q + VF <= m:
        vstore(d + q, vload(d + q) + b)
        q = q + VF
    while q < m:
        d[q] = d[q] + b
        q = q + 1


cdef inline void _relu_inplace(float* d, Py_ssize_t m) noexcept nogil:
    # ReLU's rule: v <= 0 gives +0 (-0 too), NaN passes (see _elementwise).
    cdef Py_ssize_t q
    cdef float v
    for q in range(m):
        v = d[q]
        d[q] = 0 if v <= 0 else v


cdef void _cv_fitem(const CV* g, const float* x, const float* wt, const float* bias,
                    const Py_ssize_t* roff, float* out, Py_ssize_t it, float* xs,
                    float* tb, float* yb, Py_ssize_t* staged) noexcept nogil:
    # Item = (image, group of position tiles). Stride 1: tile = A output rows x
    # B adjacent columns; otherwise A positions in row-major order (B = 1).
    # With yb (items of whole images) the tiles' vectors are gathered there as
    # P x kp and transposed once; otherwise each output is stored on its own.
    # staged: the image this thread's xs holds (-1: none yet, borders not written).
    cdef Py_ssize_t n = it // g.ngroups, gi = it % g.ngroups
    cdef Py_ssize_t t_lo = gi * g.gsz, t_hi = _imin(g.ntiles, t_lo + g.gsz)
    cdef Py_ssize_t t, a, b, q, kb, k, kk, y0, x0, oy, ox, vw = g.v * VF
    cdef Py_ssize_t A = g.a, B = g.b, P = g.p
    cdef Py_ssize_t prow[12]
    cdef Py_ssize_t opos[12]
    cdef const float* tv
    cdef const float* tl
    cdef float* d
    cdef float* pb
    cdef float bk, v
    cdef vf best, bv
    if t_lo >= t_hi:
        return
    if staged[0] != n:
        _stage(x + n * g.c * g.h * g.w, g.c, g.h, g.w, g.ph, g.pw, g.rs, g.qs, xs,
               staged[0] < 0)
        staged[0] = n
    for t in range(t_lo, t_hi):
        if B > 1 or g.sw == 1:
            y0 = (t // g.tx) * A
            x0 = (t % g.tx) * B
            for a in range(A):
                # Rows past the plane repeat the last one: computed, not stored.
                oy = _imin(y0 + a, g.oh - 1)
                prow[a] = oy * g.sh * g.qs + x0
                opos[a] = oy * g.ow + x0 if y0 + a < g.oh else -1
        else:
            x0 = 0
            for a in range(A):
                q = _imin(t * A + a, P - 1)
                prow[a] = (q // g.ow) * g.sh * g.qs + (q % g.ow) * g.sw
                opos[a] = q if t * A + a < P else -1
        for kb in range(g.kp // vw):
            cv_frun(A, B, g.v, xs, prow, roff, g.rows, wt + kb * vw, g.kp, tb)
            if yb != NULL:
                for a in range(A):
                    if opos[a] < 0:
                        break
                    for b in range(_imin(B, g.ow - x0)):
                        for kk in range(g.v):
                            vstore(yb + (opos[a] + b) * g.kp + kb * vw + kk * VF,
                                   vload(tb + ((a * B + b) * g.v + kk) * VF))
                continue
            for kk in range(vw):
                k = kb * vw + kk
                if k >= g.k:
                    break
                bk = bias[k] if bias != NULL else 0
                d = out + (n * g.k + k) * P
                for a in range(A):
                    if opos[a] < 0:
                        break
                    tv = tb + a * B * vw + kk
                    if g.relu:
                        for b in range(_imin(B, g.ow - x0)):
                            v = tv[b * vw] + bk
                            d[opos[a] + b] = 0 if v <= 0 else v
                    else:
                        for b in range(_imin(B, g.ow - x0)):
                            d[opos[a] + b] = tv[b * vw] + bk
    if yb != NULL and g.pool:
        # The whole image as P x kp: bias, each 2x2 window's channel vectors
        # pooled (and ReLU), oh2*ow2 x kp transposed to K x (oh2*ow2).
        pb = yb + _align16(P * g.kp)
        for oy in range(g.oh2):
            for ox in range(g.ow2):
                for kb in range(g.kp // VF):
                    tl = yb + ((2 * oy) * g.ow + 2 * ox) * g.kp + kb * VF
                    bv = vload(g.bpad + kb * VF)
                    best = vload(tl) + bv
                    best = cv_takes(best, vload(tl + g.kp) + bv)
                    best = cv_takes(best, vload(tl + g.ow * g.kp) + bv)
                    best = cv_takes(best, vload(tl + (g.ow + 1) * g.kp) + bv)
                    if g.relu:
                        best = cv_relu(best)
                    vstore(pb + (oy * g.ow2 + ox) * g.kp + kb * VF, best)
        cv_transpose(pb, g.kp, g.oh2 * g.ow2, g.k, out + n * g.k * g.oh2 * g.ow2, g.oh2 * g.ow2)
        return
    if yb != NULL:
        # The whole image as P x kp, transposed to K x P in register blocks.
        cv_transpose(yb, g.kp, P, g.k, out + n * g.k * P, P)
        if bias != NULL or g.relu:
            for k in range(g.k):
                d = out + (n * g.k + k) * P
                bk = bias[k] if bias != NULL else 0
                if bias != NULL:
                    _add_scalar(d, P, bk)
                if g.relu:
                    _relu_inplace(d, P)


cdef bint _use_cv(CV* g, bint forward) noexcept nogil:
    # Channel vectors or column vectors, from the shapes (and the build's VF)
    # only. Column vectors need stride 1 and lose when few output channels
    # fill the channel vectors. Otherwise the path with the larger fraction of
    # useful lanes: column vectors use ow of each whole number of vectors per
    # row; channel vectors K of kp and the real pairs or positions of the
    # padded tiles. Measured (1 thread, AVX-512 and AVX2): the weight gradient
    # on channel vectors wins ties (CIFAR 16x16 3x3 C32->K64: ~1.5x) and also
    # at 75% of the column vectors' useful lanes (C3->K32 32x32, at 75%: AVX2
    # 1.1x; AVX-512, since grad_out is transposed once per thread, 1.1x at
    # batch 64 and 1.3x at batch 1; AVX2 C16->K12 30x30 1.15x); the forward
    # pass loses ties (0.6-1x), so it needs strictly more.
    cdef double eff_old, eff_new
    if _cv_mode == 1 and g.sw == 1:
        return False
    if _cv_mode == 2 or g.sw != 1:
        return True
    if g.k < 12:
        return False
    _cv_setup(g)
    eff_old = <double>g.ow / (_cdiv(g.ow, VF) * VF)
    if forward:
        _cv_ftiles(g)
        eff_new = (<double>g.k / g.kp) * g.p / (g.ntiles * g.a * g.b)
        return eff_new > eff_old
    _cv_wtiles(g)
    eff_new = (<double>g.k / g.kp) * (g.c * g.kh) / g.ppad
    return eff_new >= 0.75 * eff_old


cdef int _cv_forward(CV* g, const float* x, const float* weight, const float* bias,
                     float* out, int num_threads) noexcept nogil:
    # Returns -1 when memory is missing, -2 when g.pool asks for items the
    # shapes do not give (whole images gathered in yb).
    cdef Py_ssize_t items, it, tid, per, r, k, tbs, ybs, c, i, j
    cdef int nt
    cdef float* buf
    cdef float* wt
    cdef float* bp
    cdef Py_ssize_t* roff
    cdef Py_ssize_t* staged
    cdef void* mem
    _cv_setup(g)
    g.direct = False
    _cv_ftiles(g)
    g.gsz = _cdiv(g.ntiles, _imin(g.ntiles, _cdiv(8, g.n)))
    g.ngroups = _cdiv(g.ntiles, g.gsz)
    items = g.n * g.ngroups
    nt = _threads(g.n * g.k * g.p * g.rows, items, num_threads)
    tbs = _align16(g.a * g.b * g.v * VF)
    ybs = _align16(g.p * g.kp) if g.ngroups == 1 and g.p * g.kp <= (1 << 20) else 0
    if g.pool:
        # The caller pools here only items of whole images gathered in yb.
        if ybs == 0:
            return -2
        ybs = ybs + _align16(g.oh2 * g.ow2 * g.kp)
    per = g.xs_size + tbs + ybs
    mem = malloc((nt * per + g.rows * g.kp + _align16(g.kp)) * sizeof(float)
                 + g.rows * sizeof(Py_ssize_t) + nt * 64 + 128)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    wt = buf + nt * per
    bp = wt + g.rows * g.kp
    if g.pool:
        for k in range(g.kp):
            bp[k] = bias[k] if bias != NULL and k < g.k else 0
    g.bpad = bp
    roff = <Py_ssize_t*>(bp + _align16(g.kp))
    # One cache line per thread for its `staged` marker (no false sharing).
    staged = roff + g.rows + 8 - g.rows % 8
    for it in range(nt):
        staged[it * 8] = -1
    for it in range(nt):
        memset(buf + it * per + g.c * g.rs * g.qs, 0, (g.xs_size - g.c * g.rs * g.qs) * sizeof(float))
    # roff[(c, i, j)]: tap (c, i, j) of output position 0 in the staged image;
    # filters as Wt[(c, i, j)][k], channels past K zero.
    for c in range(g.c):
        for i in range(g.kh):
            for j in range(g.kw):
                roff[(c * g.kh + i) * g.kw + j] = (c * g.rs + i) * g.qs + j
    cv_transpose(weight, g.rows, g.k, g.rows, wt, g.kp)
    if g.kp > g.k:
        for r in range(g.rows):
            for k in range(g.k, g.kp):
                wt[r * g.kp + k] = 0
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        _cv_fitem(g, x, wt, bias, roff, out, it, buf + tid * per, buf + tid * per + g.xs_size,
                  buf + tid * per + g.xs_size + tbs if ybs > 0 else NULL, staged + tid * 8)
    free(mem)
    return 0


# ----------------------------------------------------------------------------
# Scalar path: float64 and any stride
# ----------------------------------------------------------------------------

cdef inline void _col_range(Py_ssize_t j, Py_ssize_t pw, Py_ssize_t sw, Py_ssize_t w,
                            Py_ssize_t ow, Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    # Output columns whose input column ow*sw - pw + j lies inside [0, w).
    cdef Py_ssize_t a = pw - j
    lo[0] = _imin(_imax(0, _cdiv(a, sw) if a > 0 else 0), ow)
    hi[0] = _imax(_imin(ow, (w - 1 + a) // sw + 1 if w - 1 + a >= 0 else 0), lo[0])


cdef void _fwd_scalar(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                      const floating* bias, floating[:, :, :, ::1] out,
                      Py_ssize_t it, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                      Py_ssize_t pw, bint relu) noexcept nogil:
    cdef Py_ssize_t K = w.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t KH = w.shape[2], KW = w.shape[3], OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t n = it // K, k = it % K, c, i, j, oy, ox, ih, lo, hi
    cdef floating b = bias[k] if bias != NULL else 0
    cdef floating wv, v
    for oy in range(OH):
        for ox in range(OW):
            out[n, k, oy, ox] = b
    for c in range(C):
        for i in range(KH):
            for j in range(KW):
                wv = w[k, c, i, j]
                _col_range(j, pw, sw, W, OW, &lo, &hi)
                for oy in range(OH):
                    ih = oy * sh - ph + i
                    if ih < 0 or ih >= H:
                        continue
                    for ox in range(lo, hi):
                        out[n, k, oy, ox] += wv * x[n, c, ih, ox * sw - pw + j]
    if relu:
        # On the finished plane, while it is in cache: ReLU's rule (v <= 0
        # gives +0, NaN passes), so the result is that of a separate ReLU.
        for oy in range(OH):
            for ox in range(OW):
                v = out[n, k, oy, ox]
                out[n, k, oy, ox] = 0 if v <= 0 else v


cdef void _dx_scalar(const floating[:, :, :, ::1] go, const floating[:, :, :, ::1] w,
                     floating[:, :, :, ::1] dx, Py_ssize_t it, Py_ssize_t sh, Py_ssize_t sw,
                     Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t K = w.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t KH = w.shape[2], KW = w.shape[3], OH = go.shape[2], OW = go.shape[3]
    cdef Py_ssize_t n = it // C, c = it % C, k, i, j, oy, ox, ih, lo, hi
    cdef floating wv
    for ih in range(H):
        for ox in range(W):
            dx[n, c, ih, ox] = 0
    for k in range(K):
        for i in range(KH):
            for j in range(KW):
                wv = w[k, c, i, j]
                _col_range(j, pw, sw, W, OW, &lo, &hi)
                for oy in range(OH):
                    ih = oy * sh - ph + i
                    if ih < 0 or ih >= H:
                        continue
                    for ox in range(lo, hi):
                        dx[n, c, ih, ox * sw - pw + j] += wv * go[n, k, oy, ox]


cdef void _dw_scalar(const floating[:, :, :, ::1] go, const floating[:, :, :, ::1] x,
                     floating[:, :, :, ::1] dw, Py_ssize_t it, Py_ssize_t sh, Py_ssize_t sw,
                     Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t KH = dw.shape[2], KW = dw.shape[3], OH = go.shape[2], OW = go.shape[3]
    cdef Py_ssize_t k = it // C, c = it % C, n, i, j, oy, ox, ih, lo, hi
    cdef floating s
    for i in range(KH):
        for j in range(KW):
            _col_range(j, pw, sw, W, OW, &lo, &hi)
            s = 0
            for n in range(N):
                for oy in range(OH):
                    ih = oy * sh - ph + i
                    if ih < 0 or ih >= H:
                        continue
                    for ox in range(lo, hi):
                        s = s + go[n, k, oy, ox] * x[n, c, ih, ox * sw - pw + j]
            dw[k, c, i, j] = s


cdef int _packed_corr(Corr* g, const float* weight, bint flip, const float* src,
                      const float* bias, float* dst, int num_threads) noexcept nogil:
    # Packs the (K, C, KH, KW) filters as [cout block][cin][kh][kw][kr], so one
    # step reads kr adjacent weights, and runs the correlation. flip=False is
    # the forward pass (cout=K, cin=C); flip=True the input gradient (cout=C,
    # cin=K, taps mirrored in both axes). Returns -1 when memory is missing.
    cdef Py_ssize_t KH = g.kh, KW = g.kw, cin = g.cin, cout = g.cout, T = KH * KW
    cdef Py_ssize_t b, q, t, a, o, nb, kv, kr
    cdef float* wpk
    cdef float* blk
    cdef float* bpk
    cdef int rc
    _choose_tile(cout, 2 * g.oh2 if g.pool else g.oh, &g.kr, &g.rb, g.pool)
    if cout == 1 and g.sh == 1 and (KH == 3 or KH == 5):
        g.kr = 1
        g.rb = 8
    kr = g.kr
    nb = _cdiv(cout, kr)
    wpk = <float*>malloc((nb * cin * T * kr + nb * kr) * sizeof(float) + 64)
    if wpk == NULL:
        return -1
    bpk = wpk + nb * cin * T * kr
    for o in range(nb * kr):
        bpk[o] = bias[o] if bias != NULL and o < cout else 0
    # Block b holds filters b*kr .. b*kr+kr-1 as [cin][kh][kw][kr] (zeros past
    # cout): a transpose of their rows. With flip the filters are those of the
    # input gradient, in/out channels swapped and taps reversed in both axes:
    # the (kr x taps) block of each input channel is transposed into its rows
    # last to first.
    for b in range(nb):
        o = b * kr
        kv = _imin(kr, cout - o)
        blk = wpk + b * cin * T * kr
        if flip:
            for q in range(cin):
                cv_transpose(weight + (q * cout + o) * T, T, kv, T, blk + (q * T + T - 1) * kr,
                             -kr)
        else:
            cv_transpose(weight + o * cin * T, cin * T, kv, cin * T, blk, kr)
        if kv < kr:
            for t in range(cin * T):
                for a in range(kv, kr):
                    blk[t * kr + a] = 0
    rc = _corr_f32(g, src, wpk, bpk, dst, num_threads)
    free(wpk)
    return rc


cdef int _pointwise_f32(const float* x, const float* weight, const float* bias, float* out,
                        Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K,
                        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh, Py_ssize_t sw, bint relu,
                        int num_threads) noexcept nogil:
    # A 1x1 convolution without padding (a ResNet shortcut) is a GEMM per image:
    # out[n] (K x P) = weight (K x C) . x[n] (C x P), P = OH * OW positions, x's
    # strided positions gathered first. The tile paths stage and walk whole
    # images for one tap (10-40 GFLOP/s); this runs at GEMM speed. Items are
    # images x column chunks fixed by the shapes; each output element is summed
    # over c in order (cdl_gemm.h), then the bias is added and ReLU applied, as
    # on the tile paths. Returns -1 when memory is missing.
    cdef Py_ssize_t P = OH * OW, HW = H * W, cw, nch, items, it, n, j0, nc, c, j, k, per, tid, r
    cdef bint strided = sh != 1 or sw != 1
    cdef int nt
    cdef void* mem
    cdef float* buf
    cdef float* gb
    cdef float* o
    cdef const float* xc
    cdef float v, bk
    cw = P
    if N < MIN_ITEMS:
        cw = _cdiv(_cdiv(P, _cdiv(MIN_ITEMS, N)), GEMM_NR) * GEMM_NR
    nch = _cdiv(P, cw)
    items = N * nch
    nt = _threads(N * K * C * P, items, num_threads)
    per = _align16(sgemm_scratch(K, cw, C) + (C * cw if strided else 0) + 16)
    mem = malloc(nt * per * sizeof(float) + 64)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        n = it // nch
        j0 = (it % nch) * cw
        nc = _imin(cw, P - j0)
        gb = buf + tid * per
        if strided:
            for c in range(C):
                xc = x + (n * C + c) * HW
                o = gb + c * nc - j0
                for r in range(j0 // OW, _cdiv(j0 + nc, OW)):
                    for j in range(_imax(j0, r * OW), _imin(j0 + nc, r * OW + OW)):
                        o[j] = xc[r * sh * W + (j - r * OW) * sw]
            sgemm(K, nc, C, weight, C, 1, gb, nc, 1, out + n * K * P + j0, P, 1, 0, 0,
                  gb + _align16(C * cw))
        else:
            sgemm(K, nc, C, weight, C, 1, x + n * C * HW + j0, HW, 1, out + n * K * P + j0, P,
                  1, 0, 0, gb)
        if bias != NULL or relu:
            for k in range(K):
                o = out + (n * K + k) * P + j0
                bk = bias[k] if bias != NULL else 0
                for j in range(nc):
                    v = o[j] + bk
                    if relu and v <= 0:
                        v = 0
                    o[j] = v
    free(mem)
    return 0


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

cdef void _pool_plane(const floating* y, floating* o, Py_ssize_t OW, Py_ssize_t OH2,
                      Py_ssize_t OW2, Py_ssize_t avail) noexcept nogil:
    # 2x2 stride-2 max-pool (floor) of one plane of width OW into OH2 x OW2;
    # avail: elements readable from y on (float32 reads whole vectors).
    cdef Py_ssize_t i, j
    cdef const floating* a
    if floating is float:
        cv_pool2_plane(y, o, OW, OH2, OW2, avail)
        return
    for i in range(OH2):
        a = y + 2 * i * OW
        for j in range(OW2):
            o[i * OW2 + j] = _pool4(a[2 * j], a[2 * j + 1], a[OW + 2 * j], a[OW + 2 * j + 1],
                                    False)


cdef void _pool_planes(const floating* y, floating* out, Py_ssize_t planes, Py_ssize_t OH,
                       Py_ssize_t OW, Py_ssize_t OH2, Py_ssize_t OW2, int num_threads) noexcept nogil:
    # Each OH x OW plane of y pooled into OH2 x OW2.
    cdef Py_ssize_t p
    for p in prange(planes, schedule="static",
                    num_threads=_threads(planes * OH * OW * 4, planes, num_threads)):
        _pool_plane(y + p * OH * OW, out + p * OH2 * OW2, OW, OH2, OW2, (planes - p) * OH * OW)


cdef int _conv_pool_chunked(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                            const floating[::1] bias, floating[:, :, :, ::1] out,
                            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                            int num_threads, bint relu, Py_ssize_t OH, Py_ssize_t OW) except -1:
    # Pooled forward on the paths that do not pool in registers: chunks of images
    # (at least 8, else about 1 MB) are convolved (ReLU included) into a scratch
    # buffer, which stays in cache, and pooled from there. Pooling max(0, y) gives the values
    # of max(0, pooled y): ReLU keeps the order, the NaNs and the cell a window
    # picks.
    cdef Py_ssize_t N = x.shape[0], K = weight.shape[0], n0, n1
    cdef Py_ssize_t plane = K * OH * OW
    cdef Py_ssize_t chunk = min(N, max(8, (1 << 18) // max(plane, 1)))
    cdef floating[:, :, :, ::1] scratch = np.empty(
        (chunk, K, OH, OW), dtype=np.float32 if floating is float else np.float64)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        _conv2d_forward(x[n0:n1], weight, bias, scratch[:n1 - n0], sh, sw, ph, pw, num_threads,
                        relu)
        with nogil:
            _pool_planes(&scratch[0, 0, 0, 0], &out[n0, 0, 0, 0], (n1 - n0) * K, OH, OW,
                         out.shape[2], out.shape[3], num_threads)
    return 0


cdef inline Py_ssize_t _useful_stride(Py_ssize_t s, Py_ssize_t size, Py_ssize_t pad,
                                      Py_ssize_t k) noexcept nogil:
    # A stride past the padded input's span leaves one output along that axis, whose
    # window it does not move: clamped, nothing sized by it (the strided input
    # gradient's s_h * s_w phases: a stride near 2**31 overflowed their malloc) grows
    # with it. The result is the same.
    cdef Py_ssize_t span = size + 2 * pad - k + 1
    return max(span, 2) if s > 1 and s > span else s


cdef int _no_scratch(str op, const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw) except -1:
    # malloc of a kernel's scratch failed: say which call, on what (x and w: arrays of
    # the input's and the weight's shapes).
    sx = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    sw_ = (w.shape[0], w.shape[1], w.shape[2], w.shape[3])
    raise MemoryError(f"{op}: could not allocate its scratch memory (input {sx}, weight "
                      f"{sw_}, stride ({sh}, {sw}), padding ({ph}, {pw}))")


cdef int _conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                         const floating[::1] bias, floating[:, :, :, ::1] out,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         int num_threads, bint relu=False, bint pool=False) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], K = weight.shape[0]
    cdef Py_ssize_t KH = weight.shape[2], KW = weight.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t it
    cdef const floating* bp = &bias[0] if bias is not None and K > 0 else NULL
    cdef Corr g
    cdef CV cv
    cdef int rc = 0, nt
    cdef Py_ssize_t given_sh = sh, given_sw = sw      # (for messages)
    sh = _useful_stride(sh, x.shape[2], ph, KH)
    sw = _useful_stride(sw, x.shape[3], pw, KW)
    if N == 0 or K == 0 or OH == 0 or OW == 0:
        return 0
    if pool:
        # out is the pooled result; the convolution's own size:
        OH = (x.shape[2] + 2 * ph - KH) // sh + 1
        OW = (x.shape[3] + 2 * pw - KW) // sw + 1
    cv.n = N; cv.c = C; cv.h = x.shape[2]; cv.w = x.shape[3]; cv.k = K
    cv.kh = KH; cv.kw = KW; cv.oh = OH; cv.ow = OW; cv.sh = sh; cv.sw = sw
    cv.ph = ph; cv.pw = pw
    cv.relu = relu
    cv.pool = False
    # the same geometry for the packed column path (stride 1 along the width)
    g.n = N; g.cin = C; g.h = x.shape[2]; g.w = x.shape[3]; g.cout = K
    g.kh = KH; g.kw = KW; g.oh = OH; g.ow = OW; g.sh = sh; g.offh = ph; g.offw = pw
    g.relu = relu
    g.pool = False
    if pool:
        if floating is float and _use_wino(C, K, KH, KW, sh, sw, ph, pw):
            # The Winograd path does not pool in registers: chunks keep the bits of
            # its unpooled result, pooled.
            return _conv_pool_chunked(x, weight, bias, out, sh, sw, ph, pw, num_threads, relu,
                                      OH, OW)
        cv.oh2 = out.shape[2]; cv.ow2 = out.shape[3]
        if floating is float and C > 0 and N >= 8 and _use_cv(&cv, True):
            # Channel-vector path, items of whole images (N >= 8): each image's
            # channel vectors pooled before the transpose to NCHW.
            cv.pool = True
            with nogil:
                rc = _cv_forward(&cv, &x[0, 0, 0, 0], &weight[0, 0, 0, 0], bp,
                                 &out[0, 0, 0, 0], num_threads)
            if rc == -1:
                _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
            if rc == 0:
                return 0
            cv.pool = False
        if floating is float and C > 0 and sw == 1 and not _use_cv(&cv, True):
            # Column path: the tiles pool their row pairs in registers.
            g.pool = True
            g.oh2 = out.shape[2]; g.ow2 = out.shape[3]
            with nogil:
                rc = _packed_corr(&g, &weight[0, 0, 0, 0], False, &x[0, 0, 0, 0], bp,
                                  &out[0, 0, 0, 0], num_threads)
            if rc != 0:
                _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
            return 0
        return _conv_pool_chunked(x, weight, bias, out, sh, sw, ph, pw, num_threads, relu, OH, OW)
    if floating is float and C > 0 and KH == 1 and KW == 1 and ph == 0 and pw == 0 \
            and _cv_mode == 0:
        with nogil:
            rc = _pointwise_f32(&x[0, 0, 0, 0], &weight[0, 0, 0, 0], bp, &out[0, 0, 0, 0], N, C,
                                x.shape[2], x.shape[3], K, OH, OW, sh, sw, relu, num_threads)
        if rc != 0:
            _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and _use_wino(C, K, KH, KW, sh, sw, ph, pw):
        with nogil:
            rc = _wino_f32(&x[0, 0, 0, 0], &weight[0, 0, 0, 0], bp, &out[0, 0, 0, 0], N, C,
                           x.shape[2], x.shape[3], K, ph, pw, OH, OW, relu, num_threads)
        if rc != 0:
            _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and C > 0 and _use_cv(&cv, True):
        with nogil:
            rc = _cv_forward(&cv, &x[0, 0, 0, 0], &weight[0, 0, 0, 0], bp, &out[0, 0, 0, 0],
                             num_threads)
        if rc != 0:
            _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and sw == 1 and C > 0:
        with nogil:
            rc = _packed_corr(&g, &weight[0, 0, 0, 0], False, &x[0, 0, 0, 0], bp,
                              &out[0, 0, 0, 0], num_threads)
        if rc != 0:
            _no_scratch("conv2d forward", x, weight, given_sh, given_sw, ph, pw)
        return 0
    nt = _threads(N * K * OH * OW * C * KH * KW, N * K, num_threads)
    with nogil:
        for it in prange(N * K, schedule="static", num_threads=nt):
            _fwd_scalar(x, weight, bp, out, it, sh, sw, ph, pw, relu)
    return 0


def conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                   const floating[::1] bias, floating[:, :, :, ::1] out,
                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, int num_threads,
                   bint relu=False, bint pool=False):
    """out = conv(x, weight) + bias (bias may be None); shapes already checked.

    relu=True: out = max(0, conv(x, weight) + bias) in the same pass, bitwise equal
    to the unfused conv followed by relu_forward (v <= 0 gives +0, NaN passes).
    pool=True (inference): out, of shape (N, K, OH // 2, OW // 2), is the 2x2
    stride-2 max-pool of that result, the full-size result never stored; bitwise the
    values of max_pool2d_relu_forward (relu=True) or max_pool2d_forward (relu=False)
    of the unpooled output. No indices: there is no backward for it."""
    _conv2d_forward(x, weight, bias, out, sh, sw, ph, pw, num_threads, relu, pool)


cdef int _conv2d_backward_input(const floating[:, :, :, ::1] grad_out,
                                const floating[:, :, :, ::1] weight,
                                floating[:, :, :, ::1] grad_input,
                                Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                int num_threads, bint accumulate=False) except -1:
    # accumulate: grad_input += the input gradient (grad_input holds another branch's).
    # The strided phases add theirs in their interleave pass, touching only the
    # cells their taps reach, and the Winograd path in its epilogue; every other
    # path runs into a scratch array first (a fresh page-faulting array and a
    # single-threaded add: 1.3x the input gradient's time on 16 -> 16 channels,
    # 32 x 32, batch 64).
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1]
    cdef Py_ssize_t H = grad_input.shape[2], W = grad_input.shape[3], K = weight.shape[0]
    cdef Py_ssize_t KH = weight.shape[2], KW = weight.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t it
    cdef Corr g
    cdef CV cv
    cdef int rc = 0, nt
    cdef floating[:, :, :, ::1] scratch
    cdef Py_ssize_t given_sh = sh, given_sw = sw      # (for messages)
    sh = _useful_stride(sh, H, ph, KH)
    sw = _useful_stride(sw, W, pw, KW)
    cdef bint s2dx = floating is float and K > 0 and sh == 2 and sw == 2 and KH == 3 \
        and KW == 3 and ph <= 1 and pw <= 1 and (
            _strided_dx_mode == 3 or (_strided_dx_mode == 0 and S2DX_AUTO))
    cdef bint phases = floating is float and K > 0 and (sh > 1 or sw > 1) and not s2dx and not (
        _strided_dx_mode == 2 or (_strided_dx_mode == 0 and N < MIN_ITEMS and KH * KW > 1))
    cdef bint wino = floating is float and _use_wino(K, C, KH, KW, sh, sw, KH - 1 - ph,
                                                     KW - 1 - pw)
    if N == 0 or C == 0 or H == 0 or W == 0:
        return 0
    if accumulate and not phases and not wino and not s2dx:
        dst = np.asarray(grad_input)
        scratch = np.empty_like(dst)
        _conv2d_backward_input(grad_out, weight, scratch, given_sh, given_sw, ph, pw,
                               num_threads)
        np.add(dst, np.asarray(scratch), out=dst)   # d + s: the separate sum's bits
        return 0
    if floating is float and sw == 1 and sh == 1 and K > 0 and KH == 1 and KW == 1 \
            and ph == 0 and pw == 0 and _cv_mode == 0:
        # 1x1: dx[n] (C x HW) = weight^T . grad_out[n], a GEMM per image
        with nogil:
            rc = _pointwise_input_grad_f32(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                           &grad_input[0, 0, 0, 0], N, C, H, W, K,
                                           num_threads)
        if rc != 0:
            _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and wino:
        # Stride 1 on the Winograd path: the forward of grad_out, padded by 2 - P,
        # with the filters flipped and in/out channels swapped; it adds to
        # grad_input in its epilogue when accumulating.
        with nogil:
            rc = _wino_flipped_f32(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                   &grad_input[0, 0, 0, 0], N, C, H, W, K, ph, pw, OH, OW,
                                   num_threads, accumulate)
        if rc != 0:
            _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and sw == 1 and sh == 1 and K > 0 and KH - 1 >= ph and KW - 1 >= pw:
        # Stride 1: the forward correlation of grad_out, padded by F-1-P, with the
        # filters flipped in both axes and in/out channels swapped. Where the
        # forward would take channel vectors (narrow planes: 8x8 uses half of each
        # 16-lane column vector), the flipped filters are written out and it does.
        cv.n = N; cv.c = K; cv.h = OH; cv.w = OW; cv.k = C
        cv.kh = KH; cv.kw = KW; cv.oh = H; cv.ow = W; cv.sh = 1; cv.sw = 1
        cv.ph = KH - 1 - ph; cv.pw = KW - 1 - pw
        cv.relu = False
        cv.pool = False
        if _use_cv(&cv, True):
            with nogil:
                rc = _cv_flipped_forward(&cv, &grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                         &grad_input[0, 0, 0, 0], num_threads)
            if rc != 0:
                _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
            return 0
    if floating is float and sw == 1 and sh == 1 and K > 0:
        # Stride 1: a correlation of grad_out, padded by F-1-P, with the filters
        # flipped in both axes and in/out channels swapped.
        g.n = N; g.cin = K; g.h = OH; g.w = OW; g.cout = C
        g.kh = KH; g.kw = KW; g.oh = H; g.ow = W; g.sh = 1
        g.offh = KH - 1 - ph; g.offw = KW - 1 - pw
        g.relu = False
        g.pool = False
        with nogil:
            rc = _packed_corr(&g, &weight[0, 0, 0, 0], True, &grad_out[0, 0, 0, 0], NULL,
                              &grad_input[0, 0, 0, 0], num_threads)
        if rc != 0:
            _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and s2dx:
        with nogil:
            rc = _strided_dx_s2_f32(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                    &grad_input[0, 0, 0, 0], N, C, H, W, K, OH, OW, ph, pw,
                                    num_threads, accumulate)
        if rc == -1:
            _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
        if rc == 0:
            return 0
        phases = True       # an image too large to stage whole: the phases stage less
    if floating is float and K > 0:
        with nogil:
            rc = -2
            # GEMM and scatter for kernels of several taps and batches under MIN_ITEMS
            # images, phases otherwise (bench/conv_parts.py, ResNet-8's strided layers,
            # 2 threads: 3x3 at batch 1-4, the GEMM took 0.37-0.83x the phases' time,
            # at 8 0.85x, at 16-64 0.99-1.20x; 1x1 at batch 1 1.0-1.4x)
            if not phases:
                rc = _strided_input_grad_gemm_f32(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                                  &grad_input[0, 0, 0, 0], N, C, H, W, K, KH,
                                                  KW, OH, OW, sh, sw, ph, pw, num_threads)
            if rc == -2:
                rc = _strided_input_grad_f32(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0],
                                             &grad_input[0, 0, 0, 0], N, C, H, W, K, KH, KW, OH,
                                             OW, sh, sw, ph, pw, num_threads, accumulate)
        if rc != 0:
            _no_scratch("conv2d input gradient", grad_input, weight, given_sh, given_sw, ph, pw)
        return 0
    nt = _threads(N * K * OH * OW * C * KH * KW, N * C, num_threads)
    with nogil:
        for it in prange(N * C, schedule="static", num_threads=nt):
            _dx_scalar(grad_out, weight, grad_input, it, sh, sw, ph, pw)
    return 0


cdef float* _flipped_filters(const float* weight, Py_ssize_t K, Py_ssize_t C, Py_ssize_t KH,
                             Py_ssize_t KW) noexcept nogil:
    # The filters of the stride-1 input gradient's forward, (C, K, KH, KW) from the
    # layer's (K, C, KH, KW), flipped in both axes, in a new malloc'd array (NULL when
    # memory is missing).
    cdef Py_ssize_t c, k, i, j
    cdef float* wf = <float*>malloc(C * K * KH * KW * sizeof(float) + 64)
    if wf == NULL:
        return NULL
    for c in range(C):
        for k in range(K):
            for i in range(KH):
                for j in range(KW):
                    wf[((c * K + k) * KH + i) * KW + j] = \
                        weight[((k * C + c) * KH + KH - 1 - i) * KW + KW - 1 - j]
    return wf


cdef int _cv_flipped_forward(CV* cv, const float* go, const float* weight, float* dx,
                             int num_threads) noexcept nogil:
    # The stride-1 input gradient on the channel-vector forward path: cv describes
    # the forward correlation of grad_out (cv.c = K channels in, cv.k = C out);
    # weight is the layer's (K, C, KH, KW). Returns -1 when memory is missing.
    cdef float* wf = _flipped_filters(weight, cv.c, cv.k, cv.kh, cv.kw)
    cdef int rc
    if wf == NULL:
        return -1
    rc = _cv_forward(cv, go, wf, NULL, dx, num_threads)
    free(wf)
    return -1 if rc == -1 else 0


cdef int _wino_flipped_f32(const float* go, const float* weight, float* dx, Py_ssize_t N,
                           Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K,
                           Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t OH, Py_ssize_t OW,
                           int num_threads, bint accumulate) noexcept nogil:
    # The 3x3 stride-1 input gradient on the Winograd path; weight is the layer's
    # (K, C, 3, 3), which the filter transform reads flipped; accumulate: dx += it.
    # Returns -1 when memory is missing.
    return _wino_f32(go, weight, NULL, dx, N, K, OH, OW, C, 2 - ph, 2 - pw, H, W, False,
                     num_threads, accumulate, True)


cdef int _pointwise_input_grad_f32(const float* go, const float* weight, float* dx,
                                   Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                                   Py_ssize_t K, int num_threads) noexcept nogil:
    # The 1x1 stride-1 input gradient: the pointwise forward of grad_out with the
    # (C, K) transpose of the weights. Returns -1 when memory is missing.
    cdef Py_ssize_t c, k
    cdef int rc
    cdef float* wt = <float*>malloc(C * K * sizeof(float) + 64)
    if wt == NULL:
        return -1
    for c in range(C):
        for k in range(K):
            wt[c * K + k] = weight[k * C + c]
    rc = _pointwise_f32(go, wt, NULL, dx, N, K, H, W, C, H, W, 1, 1, False, num_threads)
    free(wt)
    return rc


cdef int _phase_taps(Py_ssize_t a, Py_ssize_t k, Py_ssize_t s, Py_ssize_t p,
                     Py_ssize_t* u0, Py_ssize_t* off) noexcept nogil:
    # Input rows y = s*i + a (phase a) get grad_out rows o = i + d - t through taps
    # u0 + s*t, t < T: a stride-1 correlation over grad_out with those T taps in
    # reverse order, reading row i + t' - off (off = T - 1 - d). Returns T (0: the
    # phase gets no gradient).
    u0[0] = (a + p) % s
    if u0[0] >= k:
        off[0] = 0
        return 0
    cdef Py_ssize_t T = _cdiv(k - u0[0], s)
    off[0] = T - 1 - (a + p - u0[0]) // s
    return <int>T


cdef inline const float* _phase_row(const float* buf, Py_ssize_t off, const float* zeros,
                                    Py_ssize_t pl, Py_ssize_t Hp, Py_ssize_t i,
                                    Py_ssize_t Wp) noexcept nogil:
    # Row i of plane pl of the phase at buf + off (Hp x Wp planes); zeros for off -1.
    if off < 0:
        return zeros
    return buf + off + (pl * Hp + i) * Wp


cdef int _strided_input_grad_f32(const float* go, const float* weight, float* dx,
                                 Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                                 Py_ssize_t K, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t OH,
                                 Py_ssize_t OW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                                 Py_ssize_t pw, int num_threads,
                                 bint accumulate=False) noexcept nogil:
    # The input gradient of a strided convolution, phase by phase: the input cells
    # (y, x) with y % sh == a and x % sw == b form a stride-1 correlation of
    # grad_out with the taps that reach them (a 3x3 stride-2 kernel: 1x1, 1x2, 2x1
    # and 2x2 taps). Each phase runs on the path its shapes pick (channel vectors
    # for narrow phases, column tiles, a GEMM for one tap) into its own buffer;
    # one pass then interleaves the phases into dx row by row. Every tap is used
    # once: a quarter of the multiply-adds of the stride-1 correlation over
    # grad_out spread onto a zero grid. accumulate: dx += the gradient, on the cells
    # of the phases some tap reaches only (a 1x1 stride-2 shortcut: a quarter of
    # them). Returns -1 when memory is missing.
    cdef Py_ssize_t a, b, u0, v0, offh, offw, Tu, Tv, Hp, Wp, c, k, t, q, i, y, pl
    cdef Py_ssize_t nph = sh * sw, total = 0, wpmax = _cdiv(W, sw)
    cdef float* sub
    cdef float* zeros
    cdef float* base
    cdef const float* s0
    cdef const float* s1
    cdef float* buf
    cdef float* d
    cdef const float* src
    cdef Py_ssize_t* poff
    cdef Corr g
    cdef CV cv
    cdef int rc
    cdef int nt = _threads(N * C * H * W, N * C, num_threads)
    # poff[phase]: the phase's offset in buf, -1 when no tap reaches it
    poff = <Py_ssize_t*>malloc(nph * sizeof(Py_ssize_t))
    if poff == NULL:
        return -1
    for a in range(sh):
        for b in range(sw):
            Hp = _cdiv(H - a, sh) if a < H else 0
            Wp = _cdiv(W - b, sw) if b < W else 0
            poff[a * sw + b] = -1
            if Hp > 0 and Wp > 0 and _phase_taps(a, KH, sh, ph, &u0, &offh) > 0 \
                    and _phase_taps(b, KW, sw, pw, &v0, &offw) > 0:
                poff[a * sw + b] = total
                total = total + _align16(N * C * Hp * Wp)
    buf = <float*>malloc((total + C * K * KH * KW + wpmax) * sizeof(float) + 64)
    if buf == NULL:
        free(poff)
        return -1
    base = _aligned(buf)
    sub = base + total
    for a in range(sh):
        Hp = _cdiv(H - a, sh) if a < H else 0
        Tu = _phase_taps(a, KH, sh, ph, &u0, &offh)
        for b in range(sw):
            if poff[a * sw + b] < 0:
                continue
            Wp = _cdiv(W - b, sw)
            Tv = _phase_taps(b, KW, sw, pw, &v0, &offw)
            # The phase's filters as forward weights (C out, K in), taps reversed.
            for c in range(C):
                for k in range(K):
                    for t in range(Tu):
                        for q in range(Tv):
                            sub[((c * K + k) * Tu + t) * Tv + q] = weight[
                                ((k * C + c) * KH + u0 + sh * (Tu - 1 - t)) * KW
                                + v0 + sw * (Tv - 1 - q)]
            d = base + poff[a * sw + b]
            cv.n = N; cv.c = K; cv.h = OH; cv.w = OW; cv.k = C
            cv.kh = Tu; cv.kw = Tv; cv.oh = Hp; cv.ow = Wp; cv.sh = 1; cv.sw = 1
            cv.ph = offh; cv.pw = offw
            cv.relu = False
            cv.pool = False
            if Tu == 1 and Tv == 1 and offh == 0 and offw == 0 and Hp == OH and Wp == OW \
                    and _cv_mode == 0:
                # one tap (a 1x1 shortcut): a GEMM per image
                rc = _pointwise_f32(go, sub, NULL, d, N, K, OH, OW, C, Hp, Wp, 1, 1, False,
                                    num_threads)
            elif offh >= 0 and offw >= 0 and (_use_cv(&cv, True) or (
                    _cv_mode == 0 and Wp <= VF and C >= 16 and K >= 32)):
                # Phases one vector wide tie on lanes, but with their few taps the
                # column tiles' loops are short: channel vectors took 0.85x their
                # time (AVX2, 2 threads, 8x8 phases of C16/C32 from K32/K64, 1x2 to
                # 2x2 taps; 1.09x from K16, 1.02x on 16x16 phases).
                rc = _cv_forward(&cv, go, sub, NULL, d, num_threads)
            else:
                g.n = N; g.cin = K; g.h = OH; g.w = OW; g.cout = C
                g.kh = Tu; g.kw = Tv; g.oh = Hp; g.ow = Wp; g.sh = 1
                g.offh = offh; g.offw = offw
                g.relu = False
                g.pool = False
                rc = _packed_corr(&g, sub, False, go, NULL, d, num_threads)
            if rc != 0:
                free(buf)
                free(poff)
                return -1
    # A row of zeros stands in for phases no tap reaches.
    zeros = sub + C * K * KH * KW
    memset(zeros, 0, wpmax * sizeof(float))
    for pl in prange(N * C, schedule="static", num_threads=nt):
        for y in range(H):
            a = y % sh
            i = y // sh
            Hp = _cdiv(H - a, sh)
            d = dx + (pl * H + y) * W
            if accumulate:
                for b in range(_imin(sw, W)):
                    if poff[a * sw + b] < 0:
                        continue
                    Wp = _cdiv(W - b, sw)
                    src = _phase_row(base, poff[a * sw + b], zeros, pl, Hp, i, Wp)
                    for q in range(Wp):
                        d[q * sw + b] = d[q * sw + b] + src[q]
                continue
            if sw == 2:
                # the common case as one loop of pairs (the compiler interleaves them)
                s0 = _phase_row(base, poff[a * 2], zeros, pl, Hp, i, _cdiv(W, 2))
                s1 = _phase_row(base, poff[a * 2 + 1], zeros, pl, Hp, i, W // 2)
                for q in range(W // 2):
                    d[2 * q] = s0[q]
                    d[2 * q + 1] = s1[q]
                if W % 2:
                    d[W - 1] = s0[W // 2]
                continue
            for b in range(_imin(sw, W)):
                Wp = _cdiv(W - b, sw)
                src = _phase_row(base, poff[a * sw + b], zeros, pl, Hp, i, Wp)
                for q in range(Wp):
                    d[q * sw + b] = src[q]
    free(buf)
    free(poff)
    return 0


cdef int _strided_dx_s2_f32(const float* go, const float* weight, float* dx, Py_ssize_t N,
                            Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K,
                            Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t ph, Py_ssize_t pw,
                            int num_threads, bint accumulate) noexcept nogil:
    # The input gradient of a 3x3 stride-2 convolution in one pass (cdl_s2dx.h).
    # Items: (image, group of input channels), the groups smaller where the batch
    # is (as the GEMM path's); a thread stages an image's grad_out once for the
    # items of it that it runs in a row. Each cell's sum is its own: any grouping
    # gives the same bits. Returns -1 when memory is missing, -2 when one image's
    # staged grad_out would pass S2DX_MAX_STAGED floats (the phases take those).
    cdef CdlS2dx g
    cdef Py_ssize_t cg, ngr, items, it, n, c0, per, tid
    cdef Py_ssize_t* staged
    cdef float* buf
    cdef float* st
    cdef void* mem
    cdef int nt
    g.C = C; g.H = H; g.W = W; g.K = K; g.OH = OH; g.OW = OW; g.ph = ph; g.pw = pw
    s2dx_setup(&g)
    if s2dx_scratch(&g) > S2DX_MAX_STAGED:
        return -2
    cg = C
    if N < MIN_ITEMS:
        cg = _cdiv(C, _imin(C, _cdiv(MIN_ITEMS, N)))
    cg = _cdiv(cg, S2DX_KR) * S2DX_KR
    ngr = _cdiv(C, cg)
    items = N * ngr
    nt = _threads(N * K * OH * OW * C * 9, items, num_threads)
    per = _align16(s2dx_scratch(&g))
    mem = malloc(nt * per * sizeof(float) + nt * sizeof(Py_ssize_t) + 64)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    staged = <Py_ssize_t*>(buf + nt * per)
    for it in range(nt):
        staged[it] = -1
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        n = it // ngr
        c0 = (it % ngr) * cg
        st = buf + tid * per
        if staged[tid] != n:
            if staged[tid] < 0:
                memset(st, 0, per * sizeof(float))     # the zero border, once
            s2dx_stage(&g, go + n * K * OH * OW, st)
            staged[tid] = n
        s2dx_channels(&g, st, weight, dx + n * C * H * W, c0, _imin(c0 + cg, C), accumulate)
    free(mem)
    return 0


cdef int _strided_input_grad_gemm_f32(const float* go, const float* weight, float* dx,
                                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                                      Py_ssize_t K, Py_ssize_t KH, Py_ssize_t KW,
                                      Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh,
                                      Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                      int num_threads) noexcept nogil:
    # The input gradient of a strided convolution as a GEMM and a scatter, per
    # image and group of input channels: cols (rows x P) = weight^T (rows x K) .
    # grad_out[n] (K x P), rows = (c, i, j) taps, P = OH * OW positions. Tap
    # (i, j) reaches only the input cells of one phase (y % sh, x % sw), at a fixed
    # shift: its row of cols is added onto that phase's plane with unit-stride
    # vectors, and the phase planes are then interleaved into dx. Every
    # multiply-add is a useful one, in one pass over grad_out; each input cell is
    # summed over its taps in (i, j) order. Items are fixed by the shapes.
    # Returns -1 when memory is missing, -2 for more than 64 phases, an image
    # shorter than the stride, or one channel's columns over STRIDED_GEMM_MAX_COLS
    # (the phase path takes those).
    cdef Py_ssize_t T = KH * KW, P = OH * OW, HW = H * W, cg, ngr, items, it, n, c0, nc
    cdef Py_ssize_t per, tid, c, i, j, oy, ox, lo, hi, ylo, yhi, m, a, b, di, dj, q, y
    cdef Py_ssize_t[64] pofs
    cdef Py_ssize_t[64] hp
    cdef Py_ssize_t[64] wp
    cdef float* buf
    cdef float* cols
    cdef float* phs
    cdef float* pl
    cdef float* d
    cdef const float* src
    cdef const float* s0
    cdef const float* s1
    cdef void* mem
    cdef int nt
    if sh * sw > 64 or sh > H or sw > W or T * P > STRIDED_GEMM_MAX_COLS:
        return -2
    # Phase (a, b): the cells y % sh == a, x % sw == b, an hp[a] x wp[b] plane at
    # pofs[a * sw + b] within a channel's H * W floats.
    q = 0
    for a in range(sh):
        hp[a] = _cdiv(H - a, sh)
        for b in range(sw):
            wp[b] = _cdiv(W - b, sw)
            pofs[a * sw + b] = q
            q = q + hp[a] * wp[b]
    cg = C
    if N < MIN_ITEMS:
        cg = _cdiv(C, _imin(C, _cdiv(MIN_ITEMS, N)))
    # Each group's rows are their own GEMM rows and scatter: any grouping gives the
    # same bits, so the columns are bounded by shrinking the group.
    cg = _imin(cg, STRIDED_GEMM_MAX_COLS // _imax(T * P, 1))
    ngr = _cdiv(C, cg)
    items = N * ngr
    nt = _threads(N * K * P * C * T, items, num_threads)
    per = _align16(cg * T * P) + _align16(cg * HW) + _align16(sgemm_scratch(cg * T, P, K) + 16)
    mem = malloc(nt * per * sizeof(float) + 64)
    if mem == NULL:
        return -1
    buf = _aligned(mem)
    for it in prange(items, schedule="static", num_threads=nt):
        tid = omp_get_thread_num()
        n = it // ngr
        c0 = (it % ngr) * cg
        nc = _imin(cg, C - c0)
        cols = buf + tid * per
        phs = cols + _align16(cg * T * P)
        m = nc * T
        # A[r, k] = weight[k, c0 * T + r]: the (K, C*T) filters read transposed
        sgemm(m, P, K, weight + c0 * T, 1, C * T, go + n * K * P, P, 1, cols, P, 1, 0, 0,
              phs + _align16(cg * HW))
        memset(phs, 0, nc * HW * sizeof(float))
        for c in range(nc):
            for i in range(KH):
                # rows oy of tap row i land on phase a's row oy + di
                a = (i - ph) % sh
                if a < 0:
                    a = a + sh
                di = (i - ph - a) // sh
                ylo = _imax(0, -di)
                yhi = _imin(OH, hp[a] - di)
                for j in range(KW):
                    b = (j - pw) % sw
                    if b < 0:
                        b = b + sw
                    dj = (j - pw - b) // sw
                    lo = _imax(0, -dj)
                    hi = _imin(OW, wp[b] - dj)
                    if hi <= lo:
                        continue
                    pl = phs + c * HW + pofs[a * sw + b] + dj
                    src = cols + ((c * KH + i) * KW + j) * P
                    for oy in range(ylo, yhi):
                        d = pl + (oy + di) * wp[b]
                        for ox in range(lo, hi):
                            d[ox] = d[ox] + src[oy * OW + ox]
            # the phases interleaved into dx's rows
            for y in range(H):
                a = y % sh
                d = dx + ((n * C + c0 + c) * H + y) * W
                if sw == 2:
                    # the common case as one loop of pairs
                    s0 = phs + c * HW + pofs[a * 2] + (y // sh) * wp[0]
                    s1 = phs + c * HW + pofs[a * 2 + 1] + (y // sh) * wp[1]
                    for q in range(wp[1]):
                        d[2 * q] = s0[q]
                        d[2 * q + 1] = s1[q]
                    if W % 2:
                        d[W - 1] = s0[wp[1]]
                    continue
                for b in range(sw):
                    src = phs + c * HW + pofs[a * sw + b] + (y // sh) * wp[b]
                    for q in range(wp[b]):
                        d[q * sw + b] = src[q]
    free(mem)
    return 0


def conv2d_backward_input(const floating[:, :, :, ::1] grad_out,
                          const floating[:, :, :, ::1] weight,
                          floating[:, :, :, ::1] grad_input,
                          Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                          int num_threads, bint accumulate=False):
    """grad_input[n, c] = sum_k full correlation of grad_out[n, k] with flipped weight[k, c]
    (accumulate=True: added to grad_input's contents)."""
    _conv2d_backward_input(grad_out, weight, grad_input, sh, sw, ph, pw, num_threads,
                           accumulate)


cdef int _conv2d_backward_weight(const floating[:, :, :, ::1] grad_out,
                                 const floating[:, :, :, ::1] x,
                                 floating[:, :, :, ::1] grad_weight, floating[::1] grad_bias,
                                 Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                 int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], K = grad_weight.shape[0]
    cdef Py_ssize_t KH = grad_weight.shape[2], KW = grad_weight.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3], plane = OH * OW
    cdef Py_ssize_t it, n, k
    cdef floating s
    cdef WGrad g
    cdef CV cv
    cdef int rc = 0, nt
    cdef bint use_cv = False, use_wino = False
    cdef float* gbp = NULL
    cdef Py_ssize_t given_sh = sh, given_sw = sw      # (for messages)
    sh = _useful_stride(sh, x.shape[2], ph, KH)
    sw = _useful_stride(sw, x.shape[3], pw, KW)
    cv.n = N; cv.c = C; cv.h = x.shape[2]; cv.w = x.shape[3]; cv.k = K
    cv.kh = KH; cv.kw = KW; cv.oh = OH; cv.ow = OW; cv.sh = sh; cv.sw = sw
    cv.ph = ph; cv.pw = pw
    if (floating is float and K > 0 and C > 0 and KH > 0 and KW > 0 and N > 0 and OH > 0
            and OW > 0):
        # The weight gradient's GEMM tiles end in lane sums: too few tiles and they
        # cost more than the Winograd path saves (bench: 0.9-1.0x at 512 tiles, 1.2-2.6x
        # at batch 1). A tile row must also fill a vector: on AVX-512 the 8x8 plane's
        # half-empty vectors took 1.2x the direct time. Its bits depend on the thread
        # count in no case.
        use_wino = _use_wino(C, K, KH, KW, sh, sw, ph, pw) and (
            _wino_mode == 2 or (N * ((OH + 1) // 2) * ((OW + 1) // 2) >= WINO_MIN_GRAD_TILES
                                and 2 * ((OW + 1) // 2) >= VF))
        use_cv = not use_wino and _use_cv(&cv, False)
    if use_cv and grad_bias is not None:
        # grad_bias comes from the transposed grad_out the kernel builds anyway.
        gbp = <float*>&grad_bias[0]
    elif grad_bias is not None and K > 0:
        nt = _threads(N * K * plane * 8, K, num_threads)
        with nogil:
            for k in prange(K, schedule="dynamic", num_threads=nt):
                s = 0
                for n in range(N):
                    if floating is float:
                        s = s + _sum_f32(&grad_out[n, k, 0, 0], plane)
                    else:
                        for it in range(plane):
                            s = s + grad_out[n, k, it // OW, it % OW]
                grad_bias[k] = s
    if K == 0 or C == 0 or KH == 0 or KW == 0:
        return 0
    if N == 0 or OH == 0 or OW == 0:
        grad_weight[:, :, :, :] = 0
        return 0
    if floating is float and use_wino:
        with nogil:
            rc = _wino_wgrad_f32(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_weight[0, 0, 0, 0],
                                 N, C, x.shape[2], x.shape[3], K, ph, pw, OH, OW, num_threads)
        if rc != 0:
            _no_scratch("conv2d weight gradient", x, grad_weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and use_cv:
        with nogil:
            rc = _cv_wgrad(&cv, &grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_weight[0, 0, 0, 0],
                           gbp, num_threads)
        if rc != 0:
            _no_scratch("conv2d weight gradient", x, grad_weight, given_sh, given_sw, ph, pw)
        return 0
    if floating is float and sw == 1:
        g.n = N; g.c = C; g.h = x.shape[2]; g.w = x.shape[3]; g.k = K
        g.kh = KH; g.kw = KW; g.oh = OH; g.ow = OW; g.sh = sh; g.ph = ph; g.pw = pw
        with nogil:
            rc = _wgrad_f32(&g, &grad_out[0, 0, 0, 0], &x[0, 0, 0, 0],
                            &grad_weight[0, 0, 0, 0], num_threads)
        if rc != 0:
            _no_scratch("conv2d weight gradient", x, grad_weight, given_sh, given_sw, ph, pw)
        return 0
    nt = _threads(N * K * OH * OW * C * KH * KW, K * C, num_threads)
    with nogil:
        for it in prange(K * C, schedule="dynamic", num_threads=nt):
            _dw_scalar(grad_out, x, grad_weight, it, sh, sw, ph, pw)
    return 0


def conv2d_backward_weight(const floating[:, :, :, ::1] grad_out,
                           const floating[:, :, :, ::1] x,
                           floating[:, :, :, ::1] grad_weight, floating[::1] grad_bias,
                           Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                           int num_threads):
    """grad_weight[k, c, i, j] = sum_{n, oh, ow} grad_out[n, k, oh, ow] x[n, c, oh*S-P+i, ow*S-P+j];
    grad_bias[k] = sum_{n, oh, ow} grad_out[n, k, oh, ow] (skipped if None)."""
    _conv2d_backward_weight(grad_out, x, grad_weight, grad_bias, sh, sw, ph, pw, num_threads)


# ----------------------------------------------------------------------------
# Bound calls: a float32 call with its arrays bound once (cdl.model's training
# plan), so ``run`` skips the per-call buffer checks and type dispatch. The
# input can be rebound.
# ----------------------------------------------------------------------------

cdef class ConvForward:
    """conv2d_forward(x, weight, bias, out, *stride, *padding, num_threads, relu, pool)
    with its arrays bound; relu and pool as there (pool=True: out is pooled)."""
    cdef const float[:, :, :, ::1] x
    cdef const float[:, :, :, ::1] weight
    cdef const float[::1] bias
    cdef float[:, :, :, ::1] out
    cdef Py_ssize_t sh, sw, ph, pw
    cdef bint relu, pool

    def __init__(self, x, weight, bias, out, stride, padding, relu=False, pool=False):
        self.x, self.weight, self.bias, self.out = x, weight, bias, out
        (self.sh, self.sw), (self.ph, self.pw) = stride, padding
        self.relu, self.pool = relu, pool

    def bind_input(self, const float[:, :, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _conv2d_forward(self.x, self.weight, self.bias, self.out, self.sh, self.sw, self.ph,
                        self.pw, num_threads, self.relu, self.pool)


cdef class ConvBackward:
    """Weight and bias gradients, then the input gradient if grad_input is not None
    (accumulate=True: added to what grad_input holds)."""
    cdef const float[:, :, :, ::1] grad_out
    cdef const float[:, :, :, ::1] x
    cdef const float[:, :, :, ::1] weight
    cdef float[:, :, :, ::1] grad_input
    cdef float[:, :, :, ::1] grad_weight
    cdef float[::1] grad_bias
    cdef Py_ssize_t sh, sw, ph, pw
    cdef bint accumulate

    def __init__(self, grad_out, x, weight, grad_input, grad_weight, grad_bias, stride,
                 padding, accumulate=False):
        self.grad_out, self.x, self.weight = grad_out, x, weight
        self.grad_input, self.grad_weight, self.grad_bias = grad_input, grad_weight, grad_bias
        (self.sh, self.sw), (self.ph, self.pw) = stride, padding
        self.accumulate = accumulate

    def bind_input(self, const float[:, :, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _conv2d_backward_weight(self.grad_out, self.x, self.grad_weight, self.grad_bias,
                                self.sh, self.sw, self.ph, self.pw, num_threads)
        if self.grad_input is not None:
            _conv2d_backward_input(self.grad_out, self.weight, self.grad_input, self.sh,
                                   self.sw, self.ph, self.pw, num_threads, self.accumulate)

/* OPTQ's (GPTQ's) column loop inside one lazy block, rows [0, rows) (magr.optq_block).

For the block's columns i = c0..c1-1 in order, per row r (rows are independent inside a block):

    q = quant(W1[r, i]) on the grid of column i's group,   Q[r, i] = q,
    e = (W1[r, i] - q) / U1[i, i],   Err1[r, i] = e,   W1[r, k] -= e * U1[i, k]  (k = i..bs-1),

the per-column steps of magr.optq.optq's torch loop, with the same float32 operations in the same order
(the product e * U1[i, k] rounded, then subtracted; built with -ffp-contract=off, no -ffast-math), so the
results are the torch loop's to the bit. Grids are given (scale/zero per row and group); the caller fits
a new group's grid before the segment that starts at its first column.
*/
#include <stdint.h>

#include "grid.h"

#define TILE 8 /* rows per tile: each row U1[i, :] is read once for the tile's rows */

/* W1, Err1: rows x bs (row stride bs, in/out); U1: the block's bs x bs part of U (row stride ldu);
   Q: the block's columns of the quantized weight (row stride ldq, out); scale/zero: rows x n_groups;
   group_of: the group of each of the block's bs columns. Returns 0. */
int64_t magr_optq_columns(int64_t rows, int64_t bs, int64_t c0, int64_t c1, float *W1, float *Err1,
                          const float *U1, int64_t ldu, float *Q, int64_t ldq, const float *scale,
                          const float *zero, int64_t n_groups, const int64_t *group_of, int64_t maxq_i) {
    const float maxq = (float)maxq_i;
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        const int64_t R = rows - r0 < TILE ? rows - r0 : TILE;
        for (int64_t i = c0; i < c1; i++) {
            const float *restrict u = U1 + i * ldu;
            const int64_t gi = group_of[i];
            float e[TILE];
            for (int64_t t = 0; t < R; t++) {
                const int64_t r = r0 + t;
                const float w = W1[r * bs + i];
                const float q = nearest(w, scale[r * n_groups + gi], zero[r * n_groups + gi], maxq);
                e[t] = (w - q) / u[i];
                Q[r * ldq + i] = q;
                Err1[r * bs + i] = e[t];
            }
            for (int64_t t = 0; t < R; t++) {
                float *restrict w = W1 + (r0 + t) * bs;
                const float et = e[t];
                for (int64_t k = i; k < bs; k++) {
                    const float p = et * u[k];
                    w[k] = w[k] - p;
                }
            }
        }
    }
    return 0;
}

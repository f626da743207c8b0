/* Coordinate-descent passes over the columns of a quantized weight, one row tile at a time (magr.cd_sweep).

Rows are independent problems. Per row r the kernel keeps the targets of every column,

    t[k] = P[r, k] - sum_{i != k} Q[r, i] N[i, k]        (double; N has a zero diagonal),

and walks the columns j = 0..n-1 in order: the new value of column j is the nearest grid point to t[j]
(float32, the same formula as magr.quantizers.quantize); only when it differs from the old value are the
targets corrected, t -= (new - old) * N[j, :]. A pass costs O(n) per row plus O(n) per changed entry, and a
row whose pass changed nothing is converged: every further pass would repeat it, so it stops there.

With refit_group = g > 0 (the released MagR code's convention), at the first column j of every group of g
columns, in every pass, the row's grid of that group is fitted again on its current values Q[r, j:j+g] with
the grid formula of magr.quantizers.Grid.row_params (float32, beta applied again).

Compiled with -ffp-contract=off and without -ffast-math: every float operation is the IEEE one written here.
*/
#include <stdint.h>
#include <stdlib.h>

#include "grid.h"

/* passes over rows [0, rows) of Q (rows x n, float32, in/out) with targets T (rows x n, double, in/out),
   N (n x n, float32, zero diagonal), grids scale/zero (rows x n_groups, in/out), g_idx (n: column -> group).
   Rows are processed `tile` at a time so that a row N[j, :] serves every row of the tile that changed at j.
   passes_run[r] receives the passes row r swept (fewer than `passes` once it converged).
   Returns 0, or -1 when a work buffer could not be allocated. */
int64_t magr_cd_sweep(int64_t rows, int64_t n, int64_t tile, float *Q, double *T, const float *N,
                      float *scale, float *zero, int64_t n_groups, const int64_t *g_idx, int64_t refit_group,
                      float beta, int64_t maxq_i, int64_t sym, int64_t passes, int64_t *passes_run) {
    const float maxq = (float)maxq_i;
    int64_t *active = malloc(sizeof(int64_t) * tile), *changed = malloc(sizeof(int64_t) * tile);
    int64_t *who = malloc(sizeof(int64_t) * tile);
    double *delta = malloc(sizeof(double) * tile);
    if (!active || !changed || !who || !delta) {
        free(active); free(changed); free(who); free(delta);
        return -1;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        const int64_t R = rows - r0 < tile ? rows - r0 : tile;
        for (int64_t i = 0; i < R; i++) {
            active[i] = 1;
            passes_run[r0 + i] = 0;
        }
        for (int64_t p = 0; p < passes; p++) {
            int64_t any = 0;
            for (int64_t i = 0; i < R; i++) {
                any |= active[i];
                changed[i] = 0;
            }
            if (!any) break;
            for (int64_t j = 0; j < n; j++) {
                int64_t nc = 0;
                const int64_t refit = refit_group > 0 && j % refit_group == 0;
                for (int64_t i = 0; i < R; i++) {
                    if (!active[i]) continue;
                    const int64_t r = r0 + i;
                    float *q = Q + r * n, *sr = scale + r * n_groups, *zr = zero + r * n_groups;
                    if (refit)
                        fit_grid(q + j, refit_group, beta, maxq, sym, sr + j / refit_group, zr + j / refit_group);
                    const float v = nearest((float)T[r * n + j], sr[g_idx[j]], zr[g_idx[j]], maxq);
                    if (v != q[j]) {
                        delta[nc] = (double)v - (double)q[j];
                        who[nc++] = r;
                        q[j] = v;
                        changed[i] = 1;
                    }
                }
                const float *Nj = N + j * n;
                for (int64_t c = 0; c < nc; c++) {
                    double *t = T + who[c] * n;
                    const double d = delta[c];
                    for (int64_t k = 0; k < n; k++) t[k] -= d * (double)Nj[k];
                }
            }
            for (int64_t i = 0; i < R; i++) {
                if (!active[i]) continue;
                passes_run[r0 + i] = p + 1;
                active[i] = changed[i];
            }
        }
    }
    free(active); free(changed); free(who); free(delta);
    return 0;
}

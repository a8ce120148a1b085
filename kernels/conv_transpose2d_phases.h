// conv_transpose2d_phases: one stride phase's output into its interleaved positions of y (planes of OH x OW).
// The phase is phase p of a stack of P phases run as one conv2d, whose output planes (PH x PW) hold, per image
// and group, P blocks of OG channels; the phase's CH x CW outputs start at row dr, column dc of its planes:
//   y[n][c][row0 + i * SH][col0 + j * SW] = part[n][(group * P + p) * OG + c % OG][dr + i][dc + j],
// with c = group * OG + c % OG. A work-item per element of the phase.

KERNEL void conv_transpose2d_phases(const GLOBAL float* RESTRICT part, GLOBAL float* RESTRICT y,
                                    int PH, int PW, int P, int p, int OG, int dr, int dc, int CH, int CW,
                                    int O, int OH, int OW, int row0, int col0, int SH, int SW, int64 total)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= total)
        return;
    const int64 plane = i / ((int64)CH * CW);  // n * O + c
    const int r = (int)(i - plane * CH * CW);
    const int pi = r / CW, pj = r - pi * CW;
    const int64 n = plane / O;
    const int c = (int)(plane - n * O);
    const int group = c / OG;
    const int64 src_plane = n * O * P + (int64)(group * P + p) * OG + (c - group * OG);
    y[plane * OH * OW + (int64)(row0 + pi * SH) * OW + col0 + pj * SW] =
        part[src_plane * PH * PW + (int64)(dr + pi) * PW + dc + pj];
}

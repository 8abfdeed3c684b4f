#!/usr/bin/env python3
"""Label (gold, prediction) pairs with math-verify's verdicts for sobre-reward's agreement test.

Usage (math-verify lives in its own venv; nothing here runs at training time):

    python3 -m venv /opt/mvenv && /opt/mvenv/bin/pip install math-verify
    /opt/mvenv/bin/python scripts/label_math_verify.py \
        > crates/sobre-reward/tests/data/math_verify_cases.jsonl

How math-verify is called, exactly as its README does (gold first in `verify`):

    gold = parse("$" + GOLD + "$")                      # the dataset's `answer`, in inline math
    pred = parse("The final answer is $\\boxed{" + PRED + "}$.")   # as a model would write it
    expected = verify(gold, pred)                       # default float_rounding=6, strict=True

The Rust test (crates/sobre-reward/tests/math_verify_agreement.rs) builds the same completion
text around PRED and scores it with the `accuracy` reward against `answer = GOLD`.

The pairs below are written by hand to cover the categories of issue 4 (thousands separators,
decimals, percentages, fractions, \\frac/\\dfrac/\\tfrac, \\sqrt, signs, scientific notation,
\\text and $ wrappers, tuples/sets, intervals, one-variable expressions), with many negatives
and cases where math-verify's verdict is surprising: the table mirrors math-verify, not taste.
"""
import json
import sys

from math_verify import parse, verify

CASES = r"""
# --- integers, thousands separators, signs
42 ||| 42
42 ||| 43
42 ||| 42.0
42 ||| -42
-42 ||| -42
-42 ||| - 42
-7 ||| 7
0 ||| 0
0 ||| -0
0 ||| 0.0
1000 ||| 1,000
1000 ||| 1{,}000
1,000 ||| 1000
1000 ||| 1\,000
1000 ||| 10000
1,234,567 ||| 1234567
1234567 ||| 1,234,567
1234567 ||| 1,234,568
1,234 ||| 1234.0
1,000,000 ||| 10^6
1,000,000 ||| 1000000.0
1,5 ||| 1.5
12 ||| 012
12 ||| 12.
123456789012345678901234567890 ||| 123456789012345678901234567890
123456789012345678901234567890 ||| 123456789012345678901234567891
18 ||| 18 + 0
7 ||| 3+4
7 ||| 14/2
7 ||| 2 \cdot 3.5
7 ||| 8-1
24 ||| 4!
10 ||| \binom{5}{2}
3 ||| |{-3}|
3 ||| \sqrt[3]{27}
1024 ||| 2^{10}
2^{10} ||| 1024
1024 ||| 2^{11}
# --- decimals and float rounding (math-verify rounds to 6 places)
0.5 ||| 0.5
0.5 ||| .5
0.5 ||| 0.50
0.5 ||| 0.05
3.14 ||| 3.14
3.14 ||| 3.140
3.14 ||| 3.141
18.90 ||| 18.9
2.25 ||| 2\frac{1}{4}
1000000 ||| 1000000.4
3 ||| 3.0000001
3 ||| 3.000001
3 ||| 2.9999999
\frac{1}{3} ||| 0.333
\frac{1}{3} ||| 0.33333
\frac{1}{3} ||| 0.333333
\frac{1}{3} ||| 0.3333333
\frac{2}{3} ||| 0.666667
\frac{2}{3} ||| 0.666666
\frac{2}{3} ||| 0.6667
\frac{1}{7} ||| 0.142857
\frac{1}{7} ||| 0.14
0.1 ||| \frac{1}{10}
0.125 ||| \frac{1}{8}
0.125 ||| 1/8
0.2 ||| 1/4
-0.75 ||| -\frac{3}{4}
-0.75 ||| \frac{3}{4}
# --- percentages (math-verify accepts x% as x/100 and as x)
50\% ||| 0.5
50\% ||| 50
50\% ||| 50\%
0.5 ||| 50\%
10\% ||| 10
10\% ||| 0.1
10 ||| 10\%
0.1 ||| 10\%
25\% ||| \frac{1}{4}
25\% ||| 25 \%
25\% ||| 0.4
12.5\% ||| 0.125
12.5\% ||| 12.5
33\% ||| 0.3
40 ||| 40\%
40 ||| 0.4
# --- fractions
\frac{1}{2} ||| 0.5
\frac{1}{2} ||| 1/2
\frac{1}{2} ||| 2/4
\frac{1}{2} ||| \dfrac{1}{2}
\frac{1}{2} ||| \tfrac{1}{2}
\frac{1}{2} ||| \frac12
\frac{1}{2} ||| \frac{2}{1}
\frac{6}{8} ||| \frac34
\frac{3}{4} ||| 0.75
\dfrac{3}{4} ||| 0.75
\tfrac34 ||| 3/4
\frac34 ||| \frac{3}{5}
\frac{9}{4} ||| 2\frac{1}{4}
\frac{9}{4} ||| 2.25
\frac{7}{2} ||| 3\frac{1}{2}
1.5 ||| \frac{3}{2}
1.5 ||| 3/2
1.5 ||| 1\frac{1}{2}
\frac{10}{3} ||| 3.33
\frac{10}{3} ||| 3.333333
\frac{-1}{2} ||| \frac{1}{-2}
-\frac{1}{2} ||| \frac{-1}{2}
-\frac{1}{2} ||| -0.5
-\frac{1}{2} ||| \frac{1}{2}
\frac{a}{b} ||| a/b
\frac{1}{1+\frac{1}{2}} ||| \frac{2}{3}
\frac{\frac{1}{2}}{\frac{3}{4}} ||| \frac{2}{3}
\frac{2}{3} ||| \frac{4}{6}
\frac{63}{400} ||| \frac{63}{400}
\frac{63}{400} ||| 0.1575
\frac{63}{400} ||| \frac{64}{400}
\frac{1}{0} ||| 1
# --- roots and irrationals
\sqrt{2} ||| \sqrt{2}
\sqrt{2} ||| \sqrt2
\sqrt{2} ||| 1.414
\sqrt{2} ||| 1.414214
\sqrt{2} ||| 1.41421356
\sqrt{2} ||| \sqrt{3}
2\sqrt{2} ||| \sqrt{8}
2\sqrt{2} ||| 2 \sqrt{2}
2\sqrt{2} ||| \sqrt{2}\cdot 2
3\sqrt{3} ||| \sqrt{27}
\sqrt{12} ||| 2\sqrt{3}
\sqrt{12} ||| 3\sqrt{2}
\frac{\sqrt{3}}{3} ||| \frac{1}{\sqrt{3}}
\frac{\sqrt{2}}{2} ||| \sqrt{2}/2
\frac{\sqrt{2}}{2} ||| \frac{1}{\sqrt{2}}
\frac{\sqrt{2}}{2} ||| \frac{\sqrt{2}}{4}
\sqrt{3}+1 ||| 1+\sqrt{3}
5\sqrt{5} ||| \sqrt{125}
\sqrt{x} ||| x^{1/2}
2+\sqrt{3} ||| \sqrt{3}+2
\pi ||| \pi
\pi ||| 3.14159
\pi ||| 3.141593
3.14 ||| \pi
2\pi ||| 2 \pi
\frac{\pi}{2} ||| \pi/2
\frac{\pi}{2} ||| 90^\circ
\frac{\pi}{4} ||| \frac{\pi}{2}
e ||| 2.718281828
\ln 2 ||| 0.693147
\log_2 8 ||| 3
e^2 ||| e^{2}
# --- scientific notation
1500 ||| 1.5 \times 10^3
1.5 \times 10^3 ||| 1500
1.5\times10^{3} ||| 1500.0
2.5 \cdot 10^{-3} ||| 0.0025
6.02 \times 10^{23} ||| 6.02\times10^{23}
6.02 \times 10^{23} ||| 6.02e23
3 \times 10^8 ||| 300000000
3 \times 10^8 ||| 3\times 10^9
1000 ||| 1e3
1000 ||| 10^3
0.001 ||| 10^{-3}
# --- text, units, dollars, degrees
5 ||| \text{5 apples}
5 ||| 5\text{ apples}
3 ||| 3 \text{ cm}
3 ||| 3\,\text{cm}
3 ||| 3\text{cm}^2
\$18.90 ||| 18.9
\$1,000 ||| 1000
\$5 ||| 5
5 ||| \$5
20 ||| \$20.00
20 ||| 20 \text{ dollars}
90^\circ ||| 90
90 ||| 90^{\circ}
45^\circ ||| 45
30^\circ ||| 60
\text{A} ||| A
A ||| A
A ||| B
A ||| (A)
C ||| \text{(C)}
B ||| \text{B}
D ||| \textbf{D}
\text{Evelyn} ||| Evelyn
\text{Evelyn} ||| \text{Evelyn}
\text{Evelyn} ||| \text{Bob}
\text{yes} ||| \text{no}
\text{east} ||| \text{East}
12 ||| \text{twelve}
\mathrm{cm} ||| \text{cm}
# --- tuples, sets, lists
(1,2) ||| (1,2)
(1,2) ||| (1, 2)
(1,2) ||| (2,1)
(1,2) ||| \left(1,2\right)
(1,2,3) ||| (1,2,3)
(1,2,3) ||| (3,2,1)
(1, 2, 3) ||| 1,2,3
(3, -4) ||| (3,-4)
(3, -4) ||| (-4, 3)
(3, -4) ||| (3, 4)
(\frac{1}{2}, 3) ||| (0.5, 3)
(2, \sqrt{3}) ||| (2, \sqrt{3})
(2, \sqrt{3}) ||| (2, 1.732)
(0,0,1) ||| (0, 0, 1)
(1,2,3,4) ||| (1,2,3)
\{1,2\} ||| \{2,1\}
\{1,2,3\} ||| \{3,1,2\}
\{1,2,3\} ||| \{1,2\}
\{1,2\} ||| \{1,2,2\}
(1,2) ||| \{1,2\}
1,2 ||| 2,1
1,2 ||| 1,2
1,2,3 ||| 3, 2, 1
1,2,3 ||| 1, 2, 4
-2, 2 ||| \pm 2
\pm 2 ||| 2,-2
\pm 2 ||| 2
2, 3 ||| x=2, x=3
3, 5 ||| 5
\{-1, 1\} ||| -1, 1
\emptyset ||| \emptyset
\emptyset ||| \{\}
# --- intervals
[2,5] ||| [2, 5]
[2,5] ||| \left[2,5\right]
[2,5] ||| [2,5)
[2,5] ||| (2,5]
[1,2) ||| [1,2)
[1,2) ||| (1,2)
(-\infty, 3] ||| (-\infty,3]
(-\infty, 3] ||| (-\infty, 3)
(-\infty, 3] ||| x \le 3
(-\infty, \infty) ||| (-\infty,\infty)
(-\infty, \infty) ||| \mathbb{R}
[0, \infty) ||| [0,\infty)
(0, \infty) ||| [0, \infty)
(0,1)\cup(2,3) ||| (0,1)\cup(2,3)
(0,1)\cup(2,3) ||| (2,3)\cup(0,1)
(0,1)\cup(2,3) ||| (0,1)\cup(2,4)
[-2, \frac{1}{2}] ||| [-2, 0.5]
[-2, \frac{1}{2}] ||| [-2, 1/2]
(-1, 1) ||| (-1,1)
\infty ||| \infty
-\infty ||| \infty
\infty ||| +\infty
# --- equations and relations
x = 3 ||| 3
3 ||| x=3
x = 3 ||| x=3
x = 3 ||| x=4
x = -2 ||| -2
y = 2x + 3 ||| 2x+3
2x+3 ||| y=2x+3
y = 2x + 3 ||| y=3+2x
y = 2x + 3 ||| y=2x-3
k = \frac{1}{2} ||| 0.5
x \le 3 ||| x \leq 3
x > 2 ||| x>2
x > 2 ||| x \ge 2
# --- expressions in one variable
x+1 ||| 1+x
x+1 ||| x+2
2x ||| x2
2x ||| 2 x
2x ||| 2 \cdot x
x^2+2x+1 ||| (x+1)^2
x^2+2x+1 ||| (x-1)^2
x^2-1 ||| (x-1)(x+1)
x^2-1 ||| (x-1)(x-1)
x^2 ||| x*x
x^3 ||| x^2 \cdot x
\frac{x}{2} ||| 0.5x
\frac{x}{2} ||| x/2
\frac{1}{x} ||| x^{-1}
\frac{x^2-1}{x-1} ||| x+1
\frac{x+1}{2} ||| \frac{x}{2}+\frac{1}{2}
3x-6 ||| 3(x-2)
3x-6 ||| 3(x+2)
2(x+1) ||| 2x+2
(x+2)^3 ||| x^3+6x^2+12x+8
(x+2)^3 ||| x^3+6x^2+12x+6
\sqrt{x^2} ||| x
\sin^2 x + \cos^2 x ||| 1
\sin(2x) ||| 2\sin x \cos x
\sin x ||| \cos x
e^{x} ||| \exp(x)
\ln(x^2) ||| 2\ln(x)
n(n+1)/2 ||| \frac{n^2+n}{2}
\frac{n(n+1)}{2} ||| \frac{n(n-1)}{2}
2^n ||| 2^{n}
a+b ||| b+a
a-b ||| b-a
t^2 - 4t + 4 ||| (t-2)^2
4\pi r^2 ||| 4 \pi r^2
\frac{4}{3}\pi r^3 ||| \frac{4\pi r^3}{3}
# --- misc realistic answers
72 ||| 72
72 ||| 72.00
18 ||| 18\%
5 ||| 5 \text{ hours}
5 ||| \text{5}
16 ||| 2^4
16 ||| 4^2
16 ||| 17
\frac{1}{4} ||| 25\%
\frac{1}{4} ||| 0.25
\frac{5}{36} ||| \frac{5}{36}
\frac{5}{36} ||| 0.138889
\frac{5}{36} ||| 0.1389
\frac{11}{2} ||| 5.5
\frac{11}{2} ||| 11/2
-\frac{11}{2} ||| -5.5
-3 ||| -3.0
-3 ||| 3
\frac{1}{2} ||| \frac{1}{2}\text{ m}
2\sqrt{5} ||| \sqrt{20}
2\sqrt{5} ||| 4.472136
2\sqrt{5} ||| 4.47
\frac{3\sqrt{2}}{2} ||| \frac{3}{\sqrt{2}}
\frac{1+\sqrt{5}}{2} ||| \frac{\sqrt{5}+1}{2}
\frac{1+\sqrt{5}}{2} ||| 1.618034
\frac{1+\sqrt{5}}{2} ||| \frac{1-\sqrt{5}}{2}
0.0625 ||| \frac{1}{16}
0.0625 ||| 1/16
100 ||| 10^2
100 ||| 99.9999999
100 ||| 99.99
2.5 ||| \frac{5}{2}
2.5 ||| 2\tfrac{1}{2}
2.5 ||| 5/2
\frac{7}{3} ||| 2.333333
\frac{7}{3} ||| 2.33
1/3 ||| \frac{1}{3}
1/3 ||| \frac{2}{6}
1/3 ||| 3
6 ||| 3!
120 ||| 5!
\dfrac{14}{3} ||| 4\frac{2}{3}
\dfrac{14}{3} ||| \frac{14}{3}
-\dfrac{14}{3} ||| \dfrac{-14}{3}
\frac{3}{8} ||| 37.5\%
\frac{3}{8} ||| 0.375
0.375 ||| \frac{3}{8}
9 ||| 3^2
9 ||| \sqrt{81}
81 ||| 9^{2}
64 ||| 4^3
64 ||| 2^{6}
64 ||| 8^{2}
2^{100} ||| 2^{100}
2^{100} ||| 2^{99}
10^{100} ||| 10^{100}
\sqrt{50} ||| 5\sqrt{2}
\sqrt{50} ||| 7.071068
\sqrt{50} ||| 7.07
0.999 ||| 1
1 ||| 0.9999999
1 ||| \frac{3}{3}
-1 ||| -1
-1 ||| \frac{-3}{3}
\frac{1}{2}x ||| \frac{x}{2}
\frac{\sqrt{6}}{3} ||| \sqrt{\frac{2}{3}}
\frac{\sqrt{6}}{3} ||| \sqrt{\frac{3}{2}}
# --- batch 2: realistic MATH / GSM8K answers
\frac{\sqrt{3}}{2} ||| \frac{\sqrt3}{2}
\frac{\sqrt{3}}{2} ||| 0.866025
\frac{\sqrt{3}}{2} ||| \frac{1}{2}\sqrt{3}
\frac{\sqrt{3}}{2} ||| \sqrt{3}/2
\frac{\sqrt{3}}{2} ||| \frac{\sqrt{2}}{2}
10\sqrt{2} ||| \sqrt{200}
10\sqrt{2} ||| 10 \sqrt 2
10\sqrt{2} ||| 14.142136
4\pi ||| 4 \pi
4\pi ||| \pi \cdot 4
4\pi ||| 12.566371
4\pi ||| 4
18\pi ||| 18 \pi \text{ cm}^2
\frac{\pi}{3} ||| \frac{1}{3}\pi
\frac{\pi}{3} ||| 60^\circ
60^\circ ||| 60
-\sqrt{3} ||| -1.732051
-\sqrt{3} ||| \sqrt{3}
\dfrac{5}{12} ||| \frac{5}{12}
\dfrac{5}{12} ||| 5/12
\dfrac{5}{12} ||| 0.416667
\dfrac{5}{12} ||| 0.42
(2,-3) ||| (2, -3)
(2,-3) ||| \left( 2, -3 \right)
(2,-3) ||| (-3,2)
(2,-3) ||| 2, -3
[-1,3] ||| [-1, 3]
[-1,3] ||| -1 \le x \le 3
1, -3 ||| -3, 1
1, -3 ||| -3 \text{ and } 1
1, -3 ||| x = 1 \text{ or } x = -3
2 ||| \text{2}
\text{(C)} ||| C
\text{(C)} ||| \text{C}
\text{(C)} ||| (D)
\textbf{(B)} ||| B
E ||| \text{E}
\begin{pmatrix} 1 \\ 2 \end{pmatrix} ||| \begin{pmatrix}1\\2\end{pmatrix}
\begin{pmatrix} 1 \\ 2 \end{pmatrix} ||| \begin{pmatrix}2\\1\end{pmatrix}
2x^2 + 3x - 5 ||| 3x + 2x^2 - 5
2x^2 + 3x - 5 ||| (2x+5)(x-1)
2x^2 + 3x - 5 ||| (2x-5)(x+1)
x^2+1 ||| 1+x^2
\frac{1}{x+1} ||| (x+1)^{-1}
\frac{x+2}{x-3} ||| \frac{2+x}{-3+x}
y^3 ||| y \cdot y^2
2^{x+1} ||| 2 \cdot 2^x
\sqrt{x+1} ||| (x+1)^{1/2}
1/(2x) ||| \frac{1}{2x}
m+n ||| n+m
3 ||| 3.0
3 ||| 3.00
3 ||| 03
1,080 ||| 1080
1,080 ||| 1,08
25,000 ||| 25000
25,000 ||| 25 000
25000 ||| 2.5 \times 10^4
\$42.50 ||| 42.5
\$42.50 ||| \$42.50
42.50 ||| 42.49
-10 ||| -10.0
-10 ||| −10
0.25 ||| \frac14
0.25 ||| 25\%
0.25 ||| 1:4
\frac{2}{5} ||| 0.4
\frac{2}{5} ||| 40\%
\frac{2}{5} ||| 2:5
\frac{13}{7} ||| 1\frac{6}{7}
\frac{13}{7} ||| 1.857143
\frac{13}{7} ||| 1.86
\frac{1}{6} ||| 0.166667
\frac{1}{6} ||| 0.1667
\frac{1}{6} ||| 16.67\%
\frac{100}{3} ||| 33\frac{1}{3}
\frac{100}{3} ||| 33.333333
\frac{100}{3} ||| 33.33
5.5 ||| 5\frac{1}{2}
5.5 ||| 11/2
5.5 ||| 5.50
5.5 ||| 5.05
0.0001 ||| 10^{-4}
0.0001 ||| 1 \times 10^{-4}
0.0001 ||| 1e-4
8 ||| 2^3
8 ||| \sqrt{64}
8 ||| \sqrt[3]{512}
8 ||| 64^{1/2}
27 ||| 3^3
1 ||| 1^{100}
2 ||| \log_{10} 100
2 ||| \log 100
\log_2 3 ||| \frac{\ln 3}{\ln 2}
\ln 3 ||| 1.098612
e^{-1} ||| \frac{1}{e}
\sqrt{2}+\sqrt{3} ||| \sqrt{3}+\sqrt{2}
\sqrt{2}+\sqrt{3} ||| \sqrt{5}
\frac{3+\sqrt{5}}{2} ||| \frac{3}{2}+\frac{\sqrt{5}}{2}
2-\sqrt{2} ||| 0.585786
i ||| i
2+3i ||| 3i+2
720 ||| 6!
5040 ||| 7!
35 ||| \binom{7}{3}
35 ||| C(7,3)
0 ||| \sin(\pi)
1 ||| \cos 0
\frac{1}{2} ||| \sin 30^\circ
\frac{1}{2} ||| \cos(\frac{\pi}{3})
-1 ||| \cos \pi
x \geq 5 ||| x \ge 5
x \geq 5 ||| 5 \le x
x \geq 5 ||| [5, \infty)
x < -2 ||| x<-2
x \ne 3 ||| x \neq 3
(-\infty, 2) \cup (3, \infty) ||| (-\infty,2)\cup(3,\infty)
(-\infty, 2) \cup (3, \infty) ||| (-\infty,2]\cup[3,\infty)
(-2, 2) ||| (-2,2)
[0, 1] ||| [0,1]
[0, 1] ||| \{0, 1\}
\{3\} ||| 3
\{2, 4, 6\} ||| 2, 4, 6
\{2, 4, 6\} ||| 6,4,2
\{2, 4, 6\} ||| 2,4
a = 2, b = 3 ||| (2, 3)
a = 2, b = 3 ||| a=2, b=3
a = 2, b = 3 ||| b=3, a=2
x = 2 ||| x=2.0
x = 2 ||| 2.0
x = \frac{1}{2} ||| x = 0.5
f(x) = 2x ||| 2x
h = 6 ||| 6 \text{ cm}
\text{Monday} ||| Monday
\text{Monday} ||| \text{Tuesday}
\text{Monday} ||| \text{monday}
\text{even} ||| \text{odd}
\text{no solution} ||| \text{no solution}
\text{True} ||| \text{true}
1.5 ||| 1.50
100 ||| 100.0
100 ||| 1 \times 10^2
7 ||| 7\%
0.07 ||| 7\%
7\% ||| 0.07
7\% ||| 7
7\% ||| 0.7
150\% ||| 1.5
150\% ||| 150
3.5\% ||| 0.035
3.5\% ||| 3.5
2019 ||| 2019
2019 ||| 2,019
1 ||| 1.0000
-0.5 ||| -\frac12
-0.5 ||| -1/2
-0.5 ||| \frac{-1}{2}
-0.5 ||| 0.5
\frac{3}{2} ||| \frac{6}{4}
\frac{3}{2} ||| 1\tfrac12
\frac{3}{2} ||| 1.5\%
\sqrt{5} ||| 5^{1/2}
\sqrt{5} ||| 5^{0.5}
\sqrt{5} ||| 2.236068
\sqrt{5} ||| 2.236
\frac{1}{\sqrt{2}} ||| 0.707107
\frac{1}{\sqrt{2}} ||| 0.7071
12\sqrt{3} ||| \sqrt{432}
12\sqrt{3} ||| 20.78
# --- batch 3: intervals, units, percentages, expressions, near misses
\frac{7}{2} ||| 3.5
-\frac{7}{2} ||| -3.5
\frac{7}{2} ||| \frac{14}{4}
(-1, 2] ||| (-1,2]
(-1, 2] ||| [-1,2]
\left[ \frac{1}{2}, 3 \right) ||| [0.5, 3)
(4, \infty) ||| (4,\infty)
(4, \infty) ||| x > 4
x > 4 ||| (4, \infty)
x < 4 ||| (-\infty, 4)
(1, -1) ||| (1,-1)
(\sqrt{2}, \pi) ||| (\sqrt2, \pi)
\{a, b\} ||| \{b, a\}
3x+2 ||| 2+3x
\frac{x}{x+1} ||| 1-\frac{1}{x+1}
x^{2}-4 ||| (x-2)(x+2)
x^2 - 5x + 6 ||| (x-2)(x-3)
x^2 - 5x + 6 ||| (x+2)(x+3)
\frac{1}{2}(x+1) ||| \frac{x+1}{2}
4 \text{ inches} ||| 4
\text{4 inches} ||| 4
5\text{ m/s} ||| 5
30\% ||| 30
30\% ||| 0.3
30\% ||| \frac{3}{10}
0.3 ||| 30
2.5\% ||| 0.025
\$2.50 ||| 2.5
\$2.50 ||| \$2.5
1.2 \times 10^{-5} ||| 0.000012
1.2 \times 10^{-5} ||| 1.2e-5
3.0 \times 10^{8} ||| 3 \times 10^8
7.5 ||| 7\frac{1}{2}
-2 ||| -2.0
-2 ||| -\frac{4}{2}
-2 ||| 2
\sqrt{3}/3 ||| \frac{\sqrt{3}}{3}
\frac{2\sqrt{6}}{3} ||| \frac{2}{3}\sqrt{6}
6\sqrt{6} ||| \sqrt{216}
\sqrt{\frac{1}{2}} ||| \frac{\sqrt{2}}{2}
\frac{5}{\sqrt{5}} ||| \sqrt{5}
1000000 ||| 10^6
1000000 ||| 1,000,000
999999 ||| 1,000,000
1,000,000 ||| 1000000.0
0.000001 ||| 10^{-6}
0.000001 ||| 0
0.0000001 ||| 0
\frac{22}{7} ||| \pi
\frac{22}{7} ||| 3.142857
\infty ||| \text{infinity}
\text{none} ||| \text{None}
\text{Alice} ||| \text{alice}
\text{Alice} ||| Alice and Bob
12 ||| 12 \text{ apples}
12 ||| twelve
-4 ||| x=-4
4 ||| x^2=16
x = 4 ||| x = 4.0
(2, 3) ||| x=2, y=3
2\pi ||| 6.283185
2\pi ||| 6.28
\pi^2 ||| 9.869604
\frac{\pi}{6} ||| 30^\circ
\frac{\pi}{6} ||| 0.523599
\frac{1}{2}\pi ||| \frac{\pi}{2}
|x| ||| \sqrt{x^2}
\frac{a+b}{2} ||| \frac{b+a}{2}
2ab ||| 2ba
a^2+b^2 ||| b^2+a^2
(a+b)^2 ||| a^2+2ab+b^2
(a+b)^2 ||| a^2+b^2
\frac{n}{n+1} ||| 1 - \frac{1}{n+1}
\frac{3}{4} ||| 3/4
\frac{3}{4} ||| 6/8
\frac{3}{4} ||| .75
\frac{3}{4} ||| 0.7500
\frac{3}{4} ||| 75
\frac{3}{4} ||| 75\%
0 ||| \emptyset
\emptyset ||| 0
10 ||| 10.
10 ||| 1 0
1/2 ||| 1 / 2
1/2 ||| 0.5.
"""


def label(gold: str, pred: str) -> bool:
    g = parse("$" + gold + "$")
    p = parse("The final answer is $\\boxed{" + pred + "}$.")
    return bool(verify(g, p))


def main() -> None:
    n = 0
    for line in CASES.strip().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        gold, pred = (s.strip() for s in line.split("|||"))
        row = {"gold": gold, "prediction": pred, "expected": label(gold, pred)}
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    print(f"labelled {n} cases", file=sys.stderr)


if __name__ == "__main__":
    main()

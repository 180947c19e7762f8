# Chart for benchmarks/bench.sh: grouped bars per target, one bar per load.
# Called as: gnuplot -e "qps='FILE'; p99='FILE'; out='PNG'; ncol=N" plot.gp
# Data files (written by benchlib.py report): header row with the load names,
# then one row per target: "name" value-per-load (NaN when not measured).
set terminal pngcairo size 1400,900 font "sans,10" noenhanced
set output out
set multiplot layout 2,1 title "dotproxy benchmark: dnsperf -c 10, median over rounds"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key top right autotitle columnheader
set xtics rotate by -20 scale 0
set xrange [-0.6:*]

set title "answered queries per second (thousands)"
set ylabel "kQPS"
set yrange [0:*]
plot for [i=2:ncol+1] qps using i:xtic(1)

set title "p99 latency (ms, log scale)"
set ylabel "ms"
set logscale y
set yrange [*:*]
plot for [i=2:ncol+1] p99 using i:xtic(1)
unset multiplot

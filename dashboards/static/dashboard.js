// Draws the dashboard's Plotly charts from the figures the server embedded as JSON.
(function () {
  "use strict";
  function draw(chartId, dataId) {
    var target = document.getElementById(chartId);
    var source = document.getElementById(dataId);
    if (!target || !source) { return; }
    var figure = JSON.parse(source.textContent);
    Plotly.newPlot(target, figure.data || [], figure.layout || {},
                   {displaylogo: false, responsive: true}).then(function () {
      target.setAttribute("data-drawn", "true");
    });
  }
  draw("throughput-chart", "throughput-data");
  draw("availability-chart", "availability-data");
})();
